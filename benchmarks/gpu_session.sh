#!/usr/bin/env bash
# One GPU session in one command: `pytest -m cuda`, then the layer benchmark (optionally alternated with an
# older tree's, then compared), then optional deploy and sweep runs.
# Usage (repository root, on the GPU machine):
#   bash benchmarks/gpu_session.sh [bench_layers.py args...]
#   BEFORE=/path/to/old/tree DEPLOY=1 SWEEP=int8dq,fp8dq bash benchmarks/gpu_session.sh --peers none
#   TESTS="tests/test_deploy.py tests/test_ops.py" TEST_TIMEOUT=500 bash benchmarks/gpu_session.sh --peers none
# BEFORE: a directory holding an older aofx/ and benchmarks/ (e.g. `git archive <commit> aofx benchmarks |
# tar -x -C old`); its bench_layers runs alternate with this tree's, twice each, and benchmarks.compare
# prints the verdict. Logs and JSON go to $OUT when set (the lent-device convention), else benchmarks/results.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the BEFORE runs start in another directory
ROOT=$PWD
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
# -v names each test as it ends, so a run cut off by the timeout still shows what failed. The AOTInductor
# (tests/test_deploy.py) and opcheck (tests/test_ops.py) tests are the slow ones: TESTS picks the paths.
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -v -m cuda -n "${TEST_WORKERS:-8}" -p no:cacheprovider -rfE \
    --durations=20 ${TESTS:-tests} > "$OUT/pytest_cuda.log" 2>&1
grep -E " (FAILED|ERROR|XPASS) " "$OUT/pytest_cuda.log"; tail -1 "$OUT/pytest_cuda.log"
bench() {  # bench <tree> <out.json> [args...]: bench_layers of that tree's aofx
    local tree=$1 out=$2; shift 2
    (cd "$tree" && PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout "${BENCH_TIMEOUT:-420}" \
        python3 -m benchmarks.bench_layers --out "$out" "$@" 2>&1 | tail -70)
}
if [ -n "${BEFORE:-}" ]; then
    for round in 1 2; do
        bench "$BEFORE" "$OUT/before_$round.json" "$@" > "$OUT/before_$round.log"
        bench "$ROOT" "$OUT/after_$round.json" "$@" > "$OUT/after_$round.log"
    done
    python3 -m benchmarks.compare --markdown --before "$OUT/before_1.json,$OUT/before_2.json" \
        --after "$OUT/after_1.json,$OUT/after_2.json" | tee "$OUT/compare.md"
else
    bench "$ROOT" "$OUT/h100.json" "$@" | tee "$OUT/bench.log"
fi
if [ -n "${DEPLOY:-}" ]; then
    timeout "${DEPLOY_TIMEOUT:-480}" python3 -m benchmarks.bench_deploy --out "$OUT/h100_deploy.json" \
        2>&1 | tee "$OUT/deploy.log" | tail -20
fi
if [ -n "${SWEEP:-}" ]; then
    timeout "${SWEEP_TIMEOUT:-480}" python3 -m benchmarks.sweep --families "$SWEEP" --out-dir "$OUT/tuning" \
        2>&1 | tee "$OUT/sweep.log" | grep BEST
fi
