#!/usr/bin/env bash
# qwen2.5-coder-0.5b_stream_w4a16g128: --stream --cache_dir --wbits 4 --group_size 128 --lwc --let (bench/stream_memory.py's run)
# Converts the GGUF to safetensors once, then quantizes block by block (calibration peak 0.47 of the fp32 size).
# Usage: bash scripts/qwen2.5-coder-0.5b_stream_w4a16g128.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:-models/qwen2.5-coder-0.5b}
[ -d "$MODEL" ] || $PY -m affinequant.convert "$MODEL.gguf" "$MODEL"
$PY main.py --model "$MODEL" --output_dir ./log/qwen2.5-coder-0.5b_stream_w4a16g128 --stream --cache_dir ./cache/qwen2.5-coder-0.5b --wbits 4 --abits 16 --group_size 128 --lwc --let --epochs 2 --nsamples 8 --seqlen 512 --calib_dataset c4 --eval_ppl --ppl_datasets wikitext2 --limit 10 "$@"
