#!/usr/bin/env bash
# Create .venv in the repo root and install pmod with its test extras, at the exact versions the
# tests passed with (constraints.txt). Idempotent: when pyproject.toml, constraints.txt and the
# mode have not changed since the last install, it only checks and returns.
#   PMOD_UNPINNED=1 bash scripts/setup.sh   # instead: the newest versions pyproject.toml allows
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "setup: error: pmod needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1) (set PYTHON=...)" >&2; exit 2; }
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if [ -n "${PMOD_UNPINNED:-}" ]; then
  mode=unpinned
  install=(--upgrade --upgrade-strategy eager)
else
  mode=pinned
  install=(-c constraints.txt)
fi
stamp=.venv/.pmod-install-stamp
wanted="$mode $(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing pmod and its dependencies into .venv, $mode (first time: a few minutes)"
  .venv/bin/python -m pip install -q "${install[@]}" -e ".[test]"
  echo "$wanted" > "$stamp"
fi
.venv/bin/python -c "import pmod_cli" >/dev/null
echo "setup: .venv ready, $mode ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
