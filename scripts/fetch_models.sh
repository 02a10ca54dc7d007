#!/usr/bin/env bash
# The real models used by the bench and the small-model scripts, into ./models (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
for m in smollm2-135m qwen2.5-coder-0.5b; do
  [ -f models/$m.gguf ] || PATH="$PWD/.venv/bin:$PATH" bash ../shared/models/fetch.sh $m models
done
