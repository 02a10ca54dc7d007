#!/usr/bin/env bash
# qwen2.5-7b_affine_w4a4: --wbits 4 --abits 4 --lwc --let --use_matrix --sf 0.1 --let_lr 1e-3 --alpha 0.75 --epochs 20 --tasks piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande
# Usage: CUDA_VISIBLE_DEVICES=0 bash scripts/qwen2.5-7b_affine_w4a4.sh [extra flags]   (runs on CPU when no GPU is visible)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:-Qwen/Qwen2.5-7B}
$PY main.py --model "$MODEL" --output_dir ./log/qwen2.5-7b_affine_w4a4 --wbits 4 --abits 4 --lwc --let --use_matrix --sf 0.1 --let_lr 1e-3 --alpha 0.75 --epochs 20 --tasks piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande --eval_ppl "$@"
