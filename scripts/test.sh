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
git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.mm' 'kernels/*.metal' 'kernels/*.h' \
  | xargs -r clang-format --dry-run --Werror

echo "== tests"
python -m pytest -q -n 2 --dist loadfile "$@"
