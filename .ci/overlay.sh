#!/usr/bin/env bash
# overlay.sh DIR "SPEC [SPEC...]" [PYTEST_ARGS...]
#
# Test kvcore against another version of one dependency without a second 3 GB install: a fresh
# venv DIR whose site-packages reads the locked .venv's packages after its own (a .pth file), into
# which pip installs SPEC (e.g. "transformers" for the newest release, "transformers==5.14.0").
# pip resolves SPEC anew against the locked set and installs only what has to differ (the package
# and any dependency its new version needs); kvcore itself is the wheel `make wheel` put into
# .venv. Prints every version the run uses, then runs pytest with PYTEST_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1
read -ra specs <<<"$2"
shift 2

base_py=.venv/bin/python
test -x "$base_py" || { echo "overlay.sh: no .venv; run make setup first" >&2; exit 1; }
base_site=$("$base_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

rm -rf "$dir"
"$base_py" -m venv --without-pip "$dir"
site=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Processed after the overlay's own packages, so what pip installs here wins.
echo "import site; site.addsitedir('$base_site')" > "$site/zz_kvcore_locked_venv.pth"

echo "== overlay $dir: pip install --upgrade ${specs[*]} over the locked .venv"
for attempt in 1 2 3; do
  "$dir/bin/python" -m pip install -q --retries 10 --upgrade --upgrade-strategy only-if-needed \
    "${specs[@]}" && break
  test "$attempt" = 3 && exit 1
  echo "pip install failed (attempt $attempt of 3), retrying"; sleep 15
done
echo "== overlay $dir: installed over the locked set"
status=0
"$dir/bin/python" - "$site" <<'PY' || status=$?
import sys
from importlib.metadata import distributions

site = sys.argv[1]
own = sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions(path=[site]))
print("  " + ("\n  ".join(own) if own else "(nothing)"))
import kvcore, numpy, torch, transformers  # noqa: E401

print(f"  python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}")
print(f"  transformers {transformers.__version__} from {transformers.__file__}")
print(f"  kvcore {kvcore.__version__} from {kvcore.__file__}")
sys.exit(0 if own else 3)
PY
if [ "$status" = 3 ]; then
  echo "== overlay $dir: the locked versions already are these; the locked run tested them"
  exit 0
fi
test "$status" = 0
"$dir/bin/python" -m pytest -q -p no:cacheprovider "$@"
