#!/usr/bin/env bash
# llama-2-7b_w4a16g128: --wbits 4 --abits 16 --group_size 128 --lwc --epochs 20 --tasks piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande
# Usage: CUDA_VISIBLE_DEVICES=0 bash scripts/llama-2-7b_w4a16g128.sh [extra flags]   (runs on CPU when no GPU is visible)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
$PY main.py --model "$MODEL" --output_dir ./log/llama-2-7b_w4a16g128 --wbits 4 --abits 16 --group_size 128 --lwc --epochs 20 --tasks piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande --eval_ppl "$@"
