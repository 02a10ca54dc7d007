#!/usr/bin/env bash
# SmolLM2-135M W3A16g128 without training: clipping search, then GPTQ (act-order). Minutes on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python main.py --model models/smollm2-135m.gguf --wbits 3 --abits 16 --group_size 128 \
  --recipe recipes/clip-gptq.yaml --nsamples 8 --seqlen 512 --calib_dataset c4 \
  --eval_ppl --ppl_datasets wikitext2 --limit 20 --output_dir log/smollm2-135m-clip-gptq-w3a16g128 "$@"
