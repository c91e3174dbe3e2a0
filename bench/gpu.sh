#!/usr/bin/env bash
# The CUDA benchmark (data path batched vs per-sample, throughput of every method, a time-boxed SimCLR quality
# run; bf16, about 7 minutes).
#   bench/gpu.sh           on a machine with a CUDA GPU
#   bench/gpu.sh --tiny    anywhere (CPU, about a minute): proves the script runs
# Options are passed to `python -m bench.gpu` (see its --help). Uses .venv/bin/python when present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export DVC_NO_ANALYTICS=1 WANDB_MODE=offline PYTHONWARNINGS=ignore
exec "$PY" -m bench.gpu "$@"
