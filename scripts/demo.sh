#!/usr/bin/env bash
# Sets up (scripts/setup.sh, demo profile: only what the main job needs) and runs metalcore's main
# job on the best device present: a self-check of every op against float64 references, a
# benchmark table and a short training run with and without metalcore, written to
# metalcore-report/ (report.md, loss.png). On a fresh 2-core machine: about 4 minutes of setup the
# first time (seconds after), then about a minute. CPU-only machines are fully supported.
# Arguments go to the main job (python -m metalcore --help).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
echo "demo [1/2] setup (scripts/setup.sh): about 4 min the first time, seconds after"
METALCORE_SETUP_PROFILE=${METALCORE_SETUP_PROFILE:-demo} bash scripts/setup.sh
echo "demo [2/2] main job (python -m metalcore${*:+ $*}): self-check, benchmark, training run;" \
  "about a minute on 2 CPU cores (setup took $((SECONDS - start)) s)"
exec "${METALCORE_VENV:-.venv}/bin/python" -m metalcore "$@"
