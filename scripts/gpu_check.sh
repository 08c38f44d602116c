#!/usr/bin/env bash
# On a CUDA machine: build with the CUDA kernels, run the CUDA tests, then the benchmark suite.
#   scripts/gpu_check.sh OUTDIR [bench args...]
# Writes OUTDIR/{build.log,tests.log,bench.log} and the benchmark JSON/PNG.
set -uo pipefail
OUTDIR=${1:?usage: scripts/gpu_check.sh OUTDIR [bench args]}
shift
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
if ! { cmake -S . -B build-dev -G Ninja -DPython_EXECUTABLE="$(command -v "$PY")" -DMETALCORE_CUDA=ON \
  && ninja -j"$(nproc)" -C build-dev; } >"$OUTDIR/build.log" 2>&1; then
  tail -60 "$OUTDIR/build.log"
  exit 1
fi
grep -E "metalcore: CUDA|warning" "$OUTDIR/build.log" | head -20
PYTHONPATH=".:${PYTHONPATH:-}" "$PY" -m pytest tests/cuda -q -p no:cacheprovider ${TEST_ARGS:-} >"$OUTDIR/tests.log" 2>&1
echo "tests rc=$?"
grep -E "passed|failed|error" "$OUTDIR/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUTDIR/tests.log" | head -30
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 "$PY" bench/run.py --device cuda "$@" 2>&1 | tee "$OUTDIR/bench.log" | tail -80
fi
