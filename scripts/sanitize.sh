#!/usr/bin/env bash
# Sanitizer job: builds the native library with AddressSanitizer + UndefinedBehaviorSanitizer in
# its own build folder (the package's library is left alone) and runs a fast subset that calls
# every op and every CPU kernel variant against it: the seeded smoke of every op under each CPU
# kernel build (AVX512/AVX2/portable), then the fuzz module's CPU tests with few examples.
# Any sanitizer report aborts the Python process, which fails the job.
#
# Usage: scripts/sanitize.sh   (inside the project's environment; PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PY=$(command -v "$PY")
BUILD=${METALCORE_SANITIZE_BUILD:-build-sanitize}

start=$SECONDS
# -O3 -g1: the release optimisation level (so the kernels' code is what ships) with file:line
# stacks (line tables only). An -O1 build also passes; it once exposed an ODR violation that
# -O3 inlining hid (see csrc/common/cpu_vec.h).
cmake -S . -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$PY" -DMETALCORE_SANITIZE=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O3 -g1 -DNDEBUG" \
  -DMETALCORE_MSIM_TESTS=OFF -DMETALCORE_CUDA=OFF >/dev/null
ninja -C "$BUILD" -j "${METALCORE_JOBS:-2}" >/dev/null
echo "sanitize: built in $((SECONDS - start))s"

# Python itself is not instrumented, so the ASan runtime must be loaded first (LD_PRELOAD), from
# the same compiler that built the library. The C++ runtime is preloaded with it: the python
# binary does not link libstdc++, and ASan resolves the real __cxa_throw when it starts, so
# without it the first C++ exception (any TORCH_CHECK) aborts with "CHECK failed ...
# real___cxa_throw".
CXX_USED=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
ASAN_RT=$("$CXX_USED" -print-file-name=libasan.so)
CXX_RT=$("$CXX_USED" -print-file-name=libstdc++.so)
for f in "$ASAN_RT" "$CXX_RT"; do
  [ -e "$f" ] || { echo "sanitize: $f not found for $CXX_USED" >&2; exit 1; }
done

export METALCORE_LIBRARY="$PWD/$BUILD/libmetalcore_ops.so"
export LD_PRELOAD="$ASAN_RT $CXX_RT"
# detect_leaks=0: CPython's own allocations at exit are reported as leaks (per-call leaks are the
# job of tests/reliability/test_leaks.py). malloc_fill_byte=255: fresh allocations read as NaN
# in every float dtype, so a kernel that leaves output elements unwritten fails the comparison.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:malloc_fill_byte=255:max_malloc_fill_size=268435456"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SEEDS=${METALCORE_SANITIZE_SEEDS:-12}

# Every CPU kernel build: the one this machine picks, then the AVX2 and portable ones.
"$PY" -m metalcore.testing.smoke --seeds "$SEEDS"
if [ "$("$PY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')" != DEFAULT ]; then
  ATEN_CPU_CAPABILITY=avx2 "$PY" -m metalcore.testing.smoke --seeds "$SEEDS" --expect-capability avx2
fi
ATEN_CPU_CAPABILITY=default "$PY" -m metalcore.testing.smoke --seeds "$SEEDS" \
  --expect-capability default
METALCORE_FUZZ_EXAMPLES=${METALCORE_SANITIZE_EXAMPLES:-8} "$PY" -m pytest -q -p no:cacheprovider \
  tests/reliability/test_fuzz.py -k "test_matches_float64_reference"
echo "sanitize: ok in $((SECONDS - start))s"
