#!/usr/bin/env bash
# The GPU user's path, checked in one run on a lent GPU box (nothing outside it reachable but the package index):
#   bash bench/gpu_check.sh                       set-up, the two real models, every check on CUDA -> bench/gpu_check.json
#   bash bench/gpu_check.sh --device cpu --tiny   the same checks on a tiny random model (CI runs this)
# Other flags go to bench/gpu_check.py (--work DIR, --out FILE). What each check is: bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=0
for arg in "$@"; do [ "$arg" = "--tiny" ] && tiny=1; done
bash scripts/setup.sh
[ "$tiny" = 1 ] || bash scripts/fetch_models.sh
exec .venv/bin/python bench/gpu_check.py "$@"
