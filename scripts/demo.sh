#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job on the embedded tiny default, on the CPU:
# pretrain (connector) -> sft (p-MoD, beta 0.5) -> eval on the held-out split -> flops -> visualize.
# Everything lands in runs/tiny/. Nothing is downloaded from a model hub.
#   EVAL_LIMIT=300 bash scripts/demo.sh    # evaluate on all 300 held-out questions (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
pmod() { .venv/bin/pmod "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

start=$SECONDS
step "1/5 pmod pretrain recipes/tiny_pretrain.toml   (connector only)"
pmod pretrain recipes/tiny_pretrain.toml
step "2/5 pmod sft recipes/tiny.toml   (connector + LLM + routers, p-MoD beta 0.5)"
pmod sft recipes/tiny.toml
step "3/5 pmod eval runs/tiny/sft --tasks pmod_tiny_vqa   (lmms-eval, held-out split)"
pmod eval runs/tiny/sft --tasks pmod_tiny_vqa --limit "${EVAL_LIMIT:-100}" --batch-size 16 \
    --device cpu --output runs/tiny/eval.json
step "4/5 pmod flops   (the tiny model as trained, and LLaVA-1.5-7B as in the paper)"
pmod flops --config runs/tiny/sft
pmod flops --model llava-1.5-7b --beta 0.5
step "5/5 pmod visualize   (which patches each layer kept)"
image=$(.venv/bin/python -c "from pmod_cli.data.tiny import resolve_tiny_path; print(resolve_tiny_path('tiny:shapes/images') / 'heldout' / 'heldout_00000.png')")
pmod visualize "$image" --checkpoint runs/tiny/sft --prompt "Is the blue triangle on the left or on the right?" \
    --output runs/tiny/visualize.png
printf '\ndemo finished in %d s: models in runs/tiny/{pretrain,sft}, report runs/tiny/eval.json, figure runs/tiny/visualize.png\n' $((SECONDS - start))
