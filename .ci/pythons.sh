#!/usr/bin/env bash
# The torch-free half of batchlab (specs, plans, the API, the store, the client's
# helpers) on other Pythons: one venv per interpreter under build/pythons/, the project's
# dependencies except torch (pinned by constraints.txt), then the torch-free tests.
# Never downloads torch: the trainer itself is checked on the main venv's Python.
#   .ci/pythons.sh [PYTHON ...]     (default: pyenv's 3.12 and 3.13; `make test-pythons`)
set -euo pipefail
cd "$(dirname "$0")/.."

pythons=("$@")
if [ ${#pythons[@]} -eq 0 ]; then
    for v in 3.12 3.13; do
        found=$(ls -d /root/.pyenv/versions/"$v".*/bin/python 2>/dev/null | tail -1 || true)
        found=${found:-$(command -v "python$v" || true)}
        if [ -n "$found" ]; then pythons+=("$found"); else echo "python$v: not found, skipped"; fi
    done
fi

# Tests that import no torch (tests/test_layering.py keeps server.app torch-free).
TESTS=(tests/test_spec.py tests/test_plan.py tests/test_shared_rules.py tests/test_status.py
       tests/test_api.py tests/test_api_auth.py tests/test_issue12_fixes.py)
# torch and what only the trainer needs of it.
SKIP='^(torch|pytorch-optimizer|pytorch_optimizer|torchvision|nvidia-.*|triton)([<>=~! ;\[]|$)'

reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
python3 - "$reqs" "$SKIP" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = project["dependencies"] + ["pytest>=8", "pytest-timeout>=2.3"]
keep = [d for d in deps if not re.match(sys.argv[2], d, re.I)]
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
PY

status=0
for py in "${pythons[@]}"; do
    version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    venv="build/pythons/$version"
    echo "== Python $version ($py)"
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # The pins of constraints.txt where they exist for this Python (torch's are skipped).
    grep -Eiv "$SKIP" constraints.txt > "$venv/constraints.txt"
    "$venv/bin/python" -m pip install -q -c "$venv/constraints.txt" -r "$reqs"
    # The project's metadata (requires-python) must accept this Python; no deps (torch).
    "$venv/bin/python" -m pip install -q --no-deps -e . > "$venv/install.log" 2>&1 ||
        { cat "$venv/install.log"; status=1; continue; }
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" || status=1
done
exit $status
