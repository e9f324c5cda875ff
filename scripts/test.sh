#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite in parallel workers (pytest-xdist).
#   bash scripts/test.sh                  everything
#   bash scripts/test.sh -m "not slow"    the fast tier (the model core for every family and method)
#   PMOD_TEST_WORKERS=0 bash scripts/test.sh ...   one process (PMOD_TEST_WORKERS=4: four workers)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# loadgroup: tests spread over the workers one by one, except those of an xdist_group (a module
# whose expensive fixture should be built once) which stay on one worker
exec .venv/bin/python -m pytest -q -n "${PMOD_TEST_WORKERS:-auto}" --dist loadgroup "$@"
