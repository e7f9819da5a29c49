"""Long-context tasks in real text for the quality benchmark, generated from a seed.

Every task is a :class:`quality_common.Task`: a context (token ids) and questions asked over it,
each with the strings a correct answer must contain. The haystack is real text that ships with
CPython: the reference prose of ``pydoc_data.topics`` and identifiers of the standard library's
sources. The tasks (``build_long_tasks``):

* ``needle-<n>k-d<depth>``: one fact ("One of the special magic numbers for KEY is: VALUE.") at
  a stated depth of the prose (10 %, 50 %, 90 % by default);
* ``kv-<n>k``: key-value retrieval among many pairs (keys: standard-library function names, values:
  7-digit numbers), three questions over one context (keys at 10 %, 50 %, 90 % of the pairs);
* ``multiturn-<n>k``: four facts spread over the prose, four questions asked one after another
  over the same compressed context;
* RULER-style (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
  Language Models?", arXiv:2404.06654; definitions as in its ``niah``, ``variable_tracking`` and
  ``common_words_extraction`` generators): ``ruler-mk`` multi-key needles (four keys, each asked
  in turn, the others are distractors), ``ruler-mv`` multi-value needles (one key, four values,
  all must be named), ``ruler-vt`` variable tracking (one chain of four hops, all five variables
  must be named), ``ruler-cwe`` common-word extraction (a numbered word list; the ten most
  frequent words must be named; one worked example first, as RULER does).

lm-eval 0.4.13 ships RULER's own generators, but they do not run offline: they download NLTK's
``punkt_tab`` and Paul Graham's essays at import time and size the samples with a model-hub
tokenizer. These generators follow the same definitions on offline text instead.

Scoring is RULER's ``string_match_all``: the share of the required strings that the greedy
answer contains (case-insensitive); a question counts as answered when it contains all of them.

Budget: ``n_tokens`` bounds the whole prompt, context plus the longest question, in the
model's own tokens; the generators fill the haystack to within one text unit of it.
"""

from __future__ import annotations

import itertools
import random
import re
import string
import sysconfig
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import quality_common as qc

# ------------------------------------------------------------------------------------------
# Real text
# ------------------------------------------------------------------------------------------

UNIT_CHARS = 400  # haystack granularity: about 100 tokens, so a depth lands within 2.5 % at 4k


@cache
def prose_units() -> tuple[str, ...]:
    """``pydoc_data.topics`` as paragraphs with their whitespace collapsed, long ones cut at
    sentence ends into pieces of at most about ``UNIT_CHARS`` characters, each ending in a
    blank line."""
    out: list[str] = []
    for para in qc.real_text().split("\n\n"):
        flat = " ".join(para.split())
        if len(flat) < 60:
            continue
        piece = ""
        for sentence in re.split(r"(?<=[.!?]) ", flat):
            if piece and len(piece) + len(sentence) > UNIT_CHARS:
                out.append(piece + "\n\n")
                piece = ""
            piece = f"{piece} {sentence}" if piece else sentence
        if piece:
            out.append(piece + "\n\n")
    return tuple(out)


@cache
def stdlib_identifiers() -> tuple[str, ...]:
    """Distinct function names (with an underscore inside, 8 to 24 characters, no leading or
    trailing underscore) defined in the top-level modules of this interpreter's standard
    library, sorted: a few thousand real identifiers."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names: set[str] = set()
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        names.update(re.findall(r"^\s*def ([a-z][a-z0-9]*_[a-z0-9_]+)\(", text, re.M))
    return tuple(sorted(n for n in names if 8 <= len(n) <= 24 and not n.endswith("_")))


@cache
def prose_words() -> tuple[str, ...]:
    """Lower-case words of 5 to 10 letters from the prose, by descending frequency (ties
    alphabetical), without the 150 most frequent (function words and the like)."""
    counts = Counter(re.findall(r"\b[a-z]{5,10}\b", qc.real_text()))
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    return tuple(ranked[150:2150])


def _key(rng: random.Random) -> str:
    """A needle key in RULER's ``words`` style: two prose words joined by a hyphen."""
    words = prose_words()
    return f"{rng.choice(words)}-{rng.choice(words)}"


def _number(rng: random.Random) -> str:
    """A 7-digit value, RULER's ``numbers`` needle value."""
    return str(rng.randrange(1_000_000, 10_000_000))


# ------------------------------------------------------------------------------------------
# Assembling a context at a token budget
# ------------------------------------------------------------------------------------------

SLACK = 8  # tokens kept free: joining pieces can merge or split a token at their borders


def _haystack(rng: random.Random, n: int) -> list[str]:
    """``n`` consecutive prose units from a seeded start (wrapping around)."""
    units = prose_units()
    start = rng.randrange(len(units))
    return [units[(start + i) % len(units)] for i in range(n)]


def _with_needles(
    tok: Any, head: str, units: list[str], needles: list[tuple[float, str]], budget: int
) -> tuple[str, dict[str, Any]]:
    """``head`` + the longest prefix of ``units`` that fits ``budget`` tokens with the needles,
    each needle inserted at the unit border nearest its depth (a fraction of the haystack's
    tokens). Returns the text and its ``meta``: the needles, the depths asked for, the depths
    reached (by the units' token counts) and ``haystack_start``, the tokens of ``head``."""
    fixed = head + "".join(s for _, s in needles)
    body = qc._fit(tok, fixed, units, "", budget)
    # a long unit can stop the prefix early: top up with the next ones that still fit
    # (counted alone, plus one token for the border)
    used = len(qc._ids(tok, fixed + "".join(body)))
    for unit in units[len(body) : len(body) + 16]:
        n = len(qc._ids(tok, unit)) + 1
        if used + n <= budget:
            body.append(unit)
            used += n
    while body and len(qc._ids(tok, fixed + "".join(body))) > budget:
        body.pop()  # the estimate above was short by a border token or two
    counts = [len(qc._ids(tok, u)) for u in body]
    cum = list(itertools.accumulate(counts, initial=0))
    total = cum[-1]
    # the unit border nearest each depth
    at = [min(range(len(cum)), key=lambda i, d=d: abs(cum[i] - d * total)) for d, _ in needles]
    landed = [cum[i] / total if total else 0.0 for i in at]
    order = sorted(range(len(needles)), key=lambda i: (at[i], i), reverse=True)
    out = list(body)
    for i in order:
        out.insert(at[i], needles[i][1])
    meta = {
        "needles": [s.strip() for _, s in needles],
        "depths": [d for d, _ in needles],
        "landed": landed,
        "haystack_start": len(qc._ids(tok, head)),
    }
    return head + "".join(out), meta


def _task(
    tok: Any,
    name: str,
    kind: str,
    context: str,
    questions: list[qc.Question],
    meta: dict[str, Any],
) -> qc.Task:
    return qc.Task(name, kind, qc._ids(tok, context), questions, meta=meta)


def _budget(n_tokens: int, questions: list[qc.Question]) -> int:
    return n_tokens - max(len(q.question_ids) for q in questions) - SLACK


HEAD_NIAH = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards.\n\n"
)


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}.\n\n"


def _niah_question(tok: Any, key: str, values: list[str]) -> qc.Question:
    many = len(values) > 1
    q = (
        f"What are all the special magic numbers for {key} mentioned in the provided text?"
        if many
        else f"What is the special magic number for {key} mentioned in the provided text?"
    )
    lead = (
        f"The special magic numbers for {key} mentioned in the provided text are"
        if many
        else f"The special magic number for {key} mentioned in the provided text is"
    )
    return qc._question(tok, q, lead, ", ".join(values), answers=values)


# ------------------------------------------------------------------------------------------
# The tasks
# ------------------------------------------------------------------------------------------


def needle_task(tok: Any, n_tokens: int, depth: float, rng: random.Random) -> qc.Task:
    """One magic-number needle at ``depth`` (a fraction of the prose haystack)."""
    key, value = _key(rng), _number(rng)
    q = _niah_question(tok, key, [value])
    text, meta = _with_needles(
        tok,
        qc.SYSTEM + HEAD_NIAH,
        _haystack(rng, n_tokens // 8),
        [(depth, _needle(key, value))],
        _budget(n_tokens, [q]),
    )
    return _task(
        tok, f"needle-{n_tokens // 1024}k-d{round(depth * 100)}", "needle", text, [q], meta
    )


def kv_task(tok: Any, n_tokens: int, rng: random.Random, depths: tuple[float, ...]) -> qc.Task:
    """Key-value retrieval: a JSON object of standard-library identifiers mapped to 7-digit
    numbers, as many pairs as fit; one question per entry of ``depths`` (the asked key's index
    among the pairs, as a fraction)."""
    pool = list(stdlib_identifiers())
    rng.shuffle(pool)
    values = [_number(rng) for _ in pool]
    head = (
        qc.SYSTEM + "Extract the value corresponding to the specified key in the JSON object "
        "below.\n\nJSON data:\n{"
    )

    def ask(key: str, value: str) -> qc.Question:
        return qc._question(
            tok,
            f'Key: "{key}"\nWhat is the value of key "{key}"?',
            f'The value of key "{key}" is',
            value,
        )

    longest = ask(max(pool, key=len), values[0])  # no asked key makes a longer question
    units = [f'\n  "{k}": {v},' for k, v in zip(pool, values, strict=True)]
    body = qc._fit(tok, head, units, "\n}", _budget(n_tokens, [longest]) - 4)
    if len(body) < 2 * len(depths):
        raise ValueError(f"kv_task: only {len(body)} pairs fit in {n_tokens} tokens")
    body[-1] = body[-1].rstrip(",")
    asked = [min(len(body) - 1, round(d * (len(body) - 1))) for d in depths]
    qs = [ask(pool[i], values[i]) for i in asked]
    meta = {
        "pairs": len(body),
        "asked": [pool[i] for i in asked],
        "depths": [i / (len(body) - 1) for i in asked],
    }
    return _task(tok, f"kv-{n_tokens // 1024}k", "kv", head + "".join(body) + "\n}", qs, meta)


ROLES = (
    "the keeper of the blue lighthouse",
    "the captain of the river ferry",
    "the gardener of the old abbey",
    "the clockmaker of the north bridge",
    "the archivist of the salt library",
    "the baker of the harbour market",
    "the warden of the glass tower",
    "the cartographer of the east road",
)
FIRST = ("Marigold", "Tobias", "Odile", "Ansel", "Perpetua", "Silas", "Ilse", "Corin", "Wendell")
LAST = ("Finch", "Wren", "Marsh", "Crane", "Holloway", "Ashdown", "Thorne", "Vesey", "Quill")


def multiturn_task(tok: Any, n_tokens: int, n_facts: int, rng: random.Random) -> qc.Task:
    """``n_facts`` facts ("Note: the name of ROLE is NAME.") spread evenly over the prose, one
    question each, asked one after another over the same compressed context."""
    roles = rng.sample(ROLES, n_facts)
    names = [
        f"{a} {b}"
        for a, b in zip(rng.sample(FIRST, n_facts), rng.sample(LAST, n_facts), strict=True)
    ]
    qs = [
        qc._question(tok, f"What is the name of {r}?", f"The name of {r} is", n)
        for r, n in zip(roles, names, strict=True)
    ]
    depths = [(i + 0.5) / n_facts for i in range(n_facts)]
    facts = [f"Note: the name of {r} is {n}.\n\n" for r, n in zip(roles, names, strict=True)]
    text, meta = _with_needles(
        tok,
        qc.SYSTEM + "Read the following documentation carefully.\n\n",
        _haystack(rng, n_tokens // 8),
        list(zip(depths, facts, strict=True)),
        _budget(n_tokens, qs),
    )
    return _task(tok, f"multiturn-{n_tokens // 1024}k", "multiturn", text, qs, meta)


def _random_depths(rng: random.Random, n: int) -> list[float]:
    """RULER draws needle depths from 40 evenly spaced ones in [0, 100] %; sorted here."""
    grid = [i / 39 for i in range(40)]
    return sorted(rng.sample(grid, n))


def multikey_task(tok: Any, n_tokens: int, n_keys: int, rng: random.Random) -> qc.Task:
    """RULER ``niah_multikey_1``: ``n_keys`` needles with different keys in the prose; each key
    is asked in turn, the other needles are its distractors."""
    keys = [_key(rng) for _ in range(n_keys)]
    values = [_number(rng) for _ in range(n_keys)]
    qs = [_niah_question(tok, k, [v]) for k, v in zip(keys, values, strict=True)]
    depths = _random_depths(rng, n_keys)
    needles = [_needle(k, v) for k, v in zip(keys, values, strict=True)]
    text, meta = _with_needles(
        tok,
        qc.SYSTEM + HEAD_NIAH,
        _haystack(rng, n_tokens // 8),
        list(zip(depths, needles, strict=True)),
        _budget(n_tokens, qs),
    )
    return _task(tok, f"ruler-mk-{n_tokens // 1024}k", "ruler_mk", text, qs, meta)


def multivalue_task(tok: Any, n_tokens: int, n_values: int, rng: random.Random) -> qc.Task:
    """RULER ``niah_multivalue``: one key with ``n_values`` needles; all values must be named."""
    key = _key(rng)
    values = [_number(rng) for _ in range(n_values)]
    q = _niah_question(tok, key, values)
    depths = _random_depths(rng, n_values)
    needles = [_needle(key, v) for v in values]
    text, meta = _with_needles(
        tok,
        qc.SYSTEM + HEAD_NIAH,
        _haystack(rng, n_tokens // 8),
        list(zip(depths, needles, strict=True)),
        _budget(n_tokens, [q]),
    )
    return _task(tok, f"ruler-mv-{n_tokens // 1024}k", "ruler_mv", text, [q], meta)


def variable_tracking_task(tok: Any, n_tokens: int, n_hops: int, rng: random.Random) -> qc.Task:
    """RULER ``variable_tracking`` (one chain): ``VAR A = 12345`` then ``VAR B = VAR A`` and so
    on for ``n_hops`` hops, the statements in order at random depths of the prose; all
    ``n_hops + 1`` variables that end up holding the number must be named."""
    names: list[str] = []
    while len(names) < n_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}"] + [
        f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(n_hops)
    ]
    q = qc._question(
        tok,
        f"Question: Find all variables that are assigned the value {value} in the text above.",
        f"Answer: According to the chain(s) of variable assignment in the text above, "
        f"{n_hops + 1} variables are assigned the value {value}, they are:",
        " ".join(names),
        answers=names,
    )
    depths = _random_depths(rng, n_hops + 1)
    text, meta = _with_needles(
        tok,
        qc.SYSTEM + "Memorize and track the chain(s) of variable assignment hidden in the "
        "following text.\n\n",
        _haystack(rng, n_tokens // 8),
        [(d, s + "\n\n") for d, s in zip(depths, chain, strict=True)],
        _budget(n_tokens, [q]),
    )
    return _task(tok, f"ruler-vt-{n_tokens // 1024}k", "ruler_vt", text, [q], meta)


def _word_list(
    rng: random.Random, words: list[str], common: int, rare: int
) -> tuple[str, list[str]]:
    """A numbered list where the first ten of ``words`` appear ``common`` times and the rest
    ``rare`` times, shuffled; and the ten common words."""
    top, rest = words[:10], words[10:]
    seq = top * common + rest * rare
    rng.shuffle(seq)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq)), top


def common_words_task(tok: Any, n_tokens: int, rng: random.Random) -> qc.Task:
    """RULER ``common_words_extraction``: at 4k tokens and more the ten common words appear 30
    times and the others 3 times (below 4k: 6 and 1); one worked example (40 words, 10 and 3
    repeats; below 4k 20 words, 3 and 1) comes first. The number of rare words is the largest
    that fits."""
    pool = list(prose_words())
    rng.shuffle(pool)
    big = n_tokens >= 4096
    ex_words, pool = pool[: 40 if big else 20], pool[40 if big else 20 :]
    example, ex_top = _word_list(rng, ex_words, 10 if big else 3, 3 if big else 1)
    head = qc.SYSTEM + (
        "Below is a numbered list of words. In these words, some appear more often than "
        "others. Memorize the ones that appear most often.\n"
    )
    ask = "Question: What are the 10 most common words in the above list?"
    lead = "Answer: The top 10 words that appear most often in the list are:"
    shot = f"{example}\n{ask}\n{lead} " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_top))
    common, rare = (30, 3) if big else (6, 1)

    order = rng.random()  # one shuffle seed for every size tried, so the search is stable

    def build(n_words: int) -> tuple[str, list[str]]:
        listing, top = _word_list(random.Random(order), pool[:n_words], common, rare)
        return head + shot + "\n\n" + head.removeprefix(qc.SYSTEM) + listing, top

    q0 = qc._question(tok, ask, lead, "", answers=[])
    budget = _budget(n_tokens, [q0]) - 60  # the answer list is longer than the probe's
    lo, hi = 11, len(pool)
    while lo < hi:  # the most words that fit
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(qc._ids(tok, build(mid)[0])) <= budget else (lo, mid - 1)
    text, top = build(lo)
    q = qc._question(
        tok, ask, lead, " ".join(f"{i + 1}. {w}" for i, w in enumerate(top)), answers=top
    )
    q.max_new_tokens = 64
    meta = {"words": lo, "common": top, "repeats": [common, rare]}
    return _task(tok, f"ruler-cwe-{n_tokens // 1024}k", "ruler_cwe", text, [q], meta)


Builder = Callable[[Any, int, random.Random, list[float]], list[qc.Task]]

#: task kind -> its generator at (tokenizer, length, rng, needle depths); the suite's order.
BUILDERS: dict[str, Builder] = {
    "needle": lambda tok, n, rng, depths: [needle_task(tok, n, d, rng) for d in depths],
    "kv": lambda tok, n, rng, _: [kv_task(tok, n, rng, (0.1, 0.5, 0.9))],
    "multiturn": lambda tok, n, rng, _: [multiturn_task(tok, n, 4, rng)],
    "ruler_mk": lambda tok, n, rng, _: [multikey_task(tok, n, 4, rng)],
    "ruler_mv": lambda tok, n, rng, _: [multivalue_task(tok, n, 4, rng)],
    "ruler_vt": lambda tok, n, rng, _: [variable_tracking_task(tok, n, 4, rng)],
    "ruler_cwe": lambda tok, n, rng, _: [common_words_task(tok, n, rng)],
}
KINDS = tuple(BUILDERS)


def build_long_tasks(
    tok: Any,
    lengths: list[int],
    seed: int = 0,
    depths: list[float] | None = None,
    kinds: list[str] | None = None,
) -> list[qc.Task]:
    """The long-context suite at each of ``lengths`` tokens: the needle at ``depths`` (default
    10/50/90 %), then key-value retrieval, multi-turn and the four RULER tasks (``kinds``: a
    subset of :data:`KINDS`, in that order). The same seed gives the same tasks."""
    kinds = list(KINDS) if kinds is None else kinds
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown task kinds {unknown}; expected a subset of {list(KINDS)}")
    depths = [0.1, 0.5, 0.9] if depths is None else depths
    rng = random.Random(seed)
    return [t for n in lengths for kind in kinds for t in BUILDERS[kind](tok, n, rng, depths)]
