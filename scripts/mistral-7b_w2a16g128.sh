#!/usr/bin/env bash
# mistral-7b_w2a16g128: --wbits 2 --abits 16 --group_size 128 --lwc --aug_loss --epochs 40 --tasks piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande
# Usage: CUDA_VISIBLE_DEVICES=0 bash scripts/mistral-7b_w2a16g128.sh [extra flags]   (runs on CPU when no GPU is visible)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:-mistralai/Mistral-7B-v0.1}
$PY main.py --model "$MODEL" --output_dir ./log/mistral-7b_w2a16g128 --wbits 2 --abits 16 --group_size 128 --lwc --aug_loss --epochs 40 --tasks piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande --eval_ppl "$@"
