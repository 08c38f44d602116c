#!/usr/bin/env bash
# Sets up (scripts/setup.sh), checks formatting and lint, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${METALCORE_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"

echo "== lint"
ruff check .
ruff format --check .
git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'csrc/*.mm' 'kernels/*.metal' 'kernels/*.h' \
  'msim/*.h' 'msim/*.cpp' \
  | xargs -r clang-format --dry-run --Werror

echo "== Metal kernels under msim: strict address-space lint"
# msim must run in CI: a missing clang would silently skip every kernel test.
command -v clang++-19 >/dev/null || { echo "clang++-19 missing (scripts/setup.sh installs it)" >&2; exit 1; }
if compgen -G "kernels/*.metal" >/dev/null; then
  python -m msim check kernels/ -I kernels
fi

echo "== CUDA kernels: compiled with nvcc (no GPU here; skipped without nvcc)"
python scripts/cuda_compile_check.py --arch 90

echo "== sanitizers (ASan + UBSan build, every op and CPU kernel build)"
if [ $# -eq 0 ]; then bash scripts/sanitize.sh; fi

echo "== tests"
# The Metal-path tests (tests/metal) must run rather than skip, and a full run must dispatch
# every kernel host name compiled from kernels/ at least once (msim coverage).
export METALCORE_REQUIRE_MSIM=1
if [ $# -eq 0 ]; then export METALCORE_REQUIRE_COVERAGE=1; fi
python -m pytest -q -n 2 --dist loadfile "$@"
