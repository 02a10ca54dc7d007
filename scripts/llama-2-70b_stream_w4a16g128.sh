#!/usr/bin/env bash
# llama-2-70b_stream_w4a16g128: --stream --cache_dir --wbits 4 --abits 16 --group_size 128 --lwc --let --epochs 20
# Never holds the model in memory: blocks are read from MODEL's safetensors one at a time, the activation caches
# live in CACHE_DIR, the export is written block by block (docs/streaming.md: about 26 GB of RAM on the CPU).
# Usage: MODEL=/path/to/Llama-2-70b-hf CACHE_DIR=/scratch/aq-cache bash scripts/llama-2-70b_stream_w4a16g128.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:?set MODEL to a local directory with the model (huggingface-cli download meta-llama/Llama-2-70b-hf --local-dir DIR)}
CACHE_DIR=${CACHE_DIR:-./cache/llama-2-70b}
$PY main.py --model "$MODEL" --output_dir ./log/llama-2-70b_stream_w4a16g128 --stream --cache_dir "$CACHE_DIR" --wbits 4 --abits 16 --group_size 128 --lwc --let --epochs 20 --eval_ppl --save_dir ./log/llama-2-70b_stream_w4a16g128/model "$@"
