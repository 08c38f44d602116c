#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs metalcore's main job on the best device present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${METALCORE_VENV:-.venv}/bin/python" -m metalcore "$@"
