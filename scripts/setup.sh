#!/usr/bin/env bash
# Sets up a development environment from a fresh checkout: system packages (when run as root
# and missing), a virtual environment in .venv with torch and the test tools, and an editable
# build of metalcore. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${METALCORE_VENV:-.venv}

# msim (the Metal-on-CPU simulator used by the kernel tests) needs clang-19 and Boost.Context.
need_apt=()
command -v clang++-19 >/dev/null || need_apt+=(clang-19 libclang-rt-19-dev)
# llvm-symbolizer-19 turns msim's fault and race reports into .metal file:line.
command -v llvm-symbolizer-19 >/dev/null || need_apt+=(llvm-19)
[ -e /usr/include/boost/context/fiber.hpp ] || need_apt+=(libboost-context-dev)
command -v ninja >/dev/null || need_apt+=(ninja-build)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing system packages (${need_apt[*]}); install them with apt-get" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# torch first and pinned: later steps must never let pip resolve a different (CUDA) torch.
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==${METALCORE_TORCH_VERSION:-2.13.0}"
"$VENV/bin/pip" install -q scikit-build-core ninja "cmake>=3.25" pybind11 numpy scipy \
  pytest pytest-xdist hypothesis expecttest "ruff==0.17.6" "clang-format==19.*" matplotlib \
  "transformers>=4.45"
# The build uses the torch installed above (no build isolation, no dependency resolution).
"$VENV/bin/pip" install -q --no-build-isolation --no-deps -e .
