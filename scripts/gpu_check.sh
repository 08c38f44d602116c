#!/usr/bin/env bash
# On a CUDA machine: build with the CUDA kernels, run the op contract on the GPU and the CUDA
# tests, then the benchmark suite.
#   scripts/gpu_check.sh OUTDIR [bench args...]
# Writes OUTDIR/{build.log,tests.log,bench.log} and the benchmark JSON/PNG.
set -uo pipefail
OUTDIR=${1:?usage: scripts/gpu_check.sh OUTDIR [bench args]}
shift
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
# Families whose CUDA kernels no GPU has run yet raise NotImplementedError unless this is set;
# this script is where they are run and validated.
export METALCORE_CUDA_UNVALIDATED=1
if ! { cmake -S . -B build-dev -G Ninja -DPython_EXECUTABLE="$(command -v "$PY")" -DMETALCORE_CUDA=ON \
  && ninja -j"$(nproc)" -C build-dev; } >"$OUTDIR/build.log" 2>&1; then
  tail -60 "$OUTDIR/build.log"
  exit 1
fi
grep -E "metalcore: CUDA|warning" "$OUTDIR/build.log" | head -20
# The op contract on the cuda device (tests/ops, the fuzzer, regressions, leaks: the device
# fixture narrowed to cuda, which must not skip) and the CUDA-specific tests (tests/cuda).
METALCORE_TEST_DEVICES=cuda METALCORE_REQUIRE_CUDA=1 PYTHONPATH=".:${PYTHONPATH:-}" "$PY" -m pytest \
  tests/cuda tests/ops tests/reliability/test_fuzz.py tests/reliability/test_regressions.py \
  tests/reliability/test_leaks.py -q -p no:cacheprovider ${TEST_ARGS:-} >"$OUTDIR/tests.log" 2>&1
echo "tests rc=$?"
grep -E "passed|failed|error" "$OUTDIR/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUTDIR/tests.log" | head -30
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 "$PY" bench/run.py --device cuda "$@" 2>&1 | tee "$OUTDIR/bench.log" | tail -80
fi
