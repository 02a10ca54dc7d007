#!/usr/bin/env bash
# mistral-7b_flatquant_w4a4kv4: FlatQuant's W4A4KV4 protocol (per-channel symmetric weights, per-token symmetric
# activations, asymmetric per-head KV4, q at 16; 128 x 2048 WikiText-2 samples, 15 epochs, batch 4, FP inputs).
# Add --gptq for GPTQ weights. Flags: --wbits 4 --abits 4 --kv_bits 4 --q_bits 16 --symmetric --flatquant --train_inputs fp --flat_lr 5e-3 --lwc_lr 5e-2 --epochs 15 --nsamples 128 --batch_size 4 --calib_dataset wikitext2
# Usage: CUDA_VISIBLE_DEVICES=0 bash scripts/mistral-7b_flatquant_w4a4kv4.sh [extra flags]   (runs on CPU when no GPU is visible)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:-mistralai/Mistral-7B-v0.1}
$PY main.py --model "$MODEL" --output_dir ./log/mistral-7b_flatquant_w4a4kv4 --wbits 4 --abits 4 --kv_bits 4 --q_bits 16 --symmetric --flatquant --train_inputs fp --flat_lr 5e-3 --lwc_lr 5e-2 --epochs 15 --nsamples 128 --batch_size 4 --calib_dataset wikitext2 --eval_ppl "$@"
