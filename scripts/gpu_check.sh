#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): on a machine with a CUDA GPU, in under 10 minutes,
# the 7B-shape benchmark, the equivalence tests in bf16 (sdpa, flash_attention_2), short bf16
# runs of the tiny recipes (full, LoRA, QLoRA) and an eval, as one table. Without CUDA it says so
# and exits 0. PYTHON=... uses that interpreter; otherwise .venv is set up as scripts/test.sh does.
#   bash scripts/gpu_check.sh [--out runs/gpu_check]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  bash scripts/setup.sh
  PYTHON=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" benchmarks/gpu_check.py "$@"
