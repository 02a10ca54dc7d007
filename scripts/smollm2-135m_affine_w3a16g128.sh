#!/usr/bin/env bash
# smollm2-135m_affine_w3a16g128: --wbits 3 --abits 16 --group_size 128 --lwc --let --use_ln_matrix --sf 1e-2 --epochs 20 --calib_dataset c4
# Usage: CUDA_VISIBLE_DEVICES=0 bash scripts/smollm2-135m_affine_w3a16g128.sh [extra flags]   (runs on CPU when no GPU is visible)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:-models/smollm2-135m.gguf}
$PY main.py --model "$MODEL" --output_dir ./log/smollm2-135m_affine_w3a16g128 --wbits 3 --abits 16 --group_size 128 --lwc --let --use_ln_matrix --sf 1e-2 --epochs 20 --calib_dataset c4 --eval_ppl "$@"
