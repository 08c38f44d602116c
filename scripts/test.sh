#!/usr/bin/env bash
# Sets up (scripts/setup.sh), checks formatting and lint, then runs the whole test suite: what CI
# runs. Prints each stage, what it does and about how long it takes on a 2-core machine; on a
# fresh one the whole run takes about 15 minutes (setup about 6, the sanitizer build about 4 of
# them the first time).
#
# With arguments, they go to pytest instead of the whole suite (and the sanitizer job is skipped):
#   bash scripts/test.sh tests/ops/test_rmsnorm.py -k backward
set -euo pipefail
cd "$(dirname "$0")/.."
run_start=$SECONDS
stage_start=$SECONDS
stage() {  # stage N "what it does" "how long it takes"
  stage_start=$SECONDS
  echo "== test [$1/6] $2${3:+ ($3)}"
}
stage_done() {
  echo "== ... done in $((SECONDS - stage_start)) s"
}

stage 1 "setup: system packages, .venv, editable build (scripts/setup.sh)" \
  "about 6 min the first time, under a minute after"
METALCORE_SETUP_PROFILE=full bash scripts/setup.sh
stage_done

VENV=${METALCORE_VENV:-.venv}
case $VENV in /*) ;; *) VENV="$PWD/$VENV" ;; esac
export PATH="$VENV/bin:$PATH"
if command -v ccache >/dev/null; then
  # The sanitizer build (and any other CMake build started from here) goes through ccache too.
  export CMAKE_CXX_COMPILER_LAUNCHER=ccache
  export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
  export CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-1}
fi

stage 2 "lint: ruff, clang-format, the GitHub workflows (actionlint), shell scripts (shellcheck)" \
  "about 10 s"
ruff check .
ruff format --check .
git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'csrc/*.mm' 'kernels/*.metal' 'kernels/*.h' \
  'msim/*.h' 'msim/*.cpp' \
  | xargs -r clang-format --dry-run --Werror
# actionlint checks the workflows against GitHub's schema and expression rules, and their run:
# scripts with shellcheck.
actionlint
shellcheck --severity=warning scripts/*.sh .ci/run
stage_done

stage 3 "Metal kernels under msim: strict address-space compile of kernels/*.metal" \
  "a few seconds"
# msim must run in CI: a missing clang would silently skip every kernel test.
command -v clang++-19 >/dev/null || { echo "clang++-19 missing (scripts/setup.sh installs it)" >&2; exit 1; }
if compgen -G "kernels/*.metal" >/dev/null; then
  python -m msim check kernels/ -I kernels
fi
stage_done

stage 4 "CUDA kernels: every CUDA source compiled with nvcc for sm_90 (no GPU needed)" \
  "about 80 s; skipped without nvcc"
python scripts/cuda_compile_check.py --arch 90
stage_done

if [ $# -eq 0 ]; then
  stage 5 "sanitizers: an ASan + UBSan build of the library, then every op and CPU kernel build" \
    "about 5 min the first time, 4 of them building; the build is cached after"
  bash scripts/sanitize.sh
  stage_done
else
  stage 5 "sanitizers: skipped (pytest arguments given)"
fi

stage 6 "tests: pytest on 2 workers" "about 6 min for the whole suite"
# The Metal-path tests (tests/metal) must run rather than skip, and a full run must dispatch
# every kernel host name compiled from kernels/ at least once (msim coverage).
export METALCORE_REQUIRE_MSIM=1
if [ $# -eq 0 ]; then export METALCORE_REQUIRE_COVERAGE=1; fi
python -m pytest -q -n 2 --dist loadfile "$@"
stage_done
echo "== test: all stages passed in $((SECONDS - run_start)) s"
