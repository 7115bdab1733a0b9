#!/usr/bin/env bash
# One GPU session in one command: `pytest -m cuda`, then the layer benchmark.
# Usage (repository root, on the GPU machine): bash benchmarks/gpu_session.sh [bench_layers.py args...]
# Logs and JSON go to $OUT when set (the lent-device convention), else benchmarks/results.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m cuda -n "${TEST_WORKERS:-8}" -p no:cacheprovider \
    2>&1 | tee "$OUT/pytest_cuda.log" | tail -40
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_layers.py --out "$OUT/h100.json" "$@" \
    2>&1 | tee "$OUT/bench.log" | tail -70
