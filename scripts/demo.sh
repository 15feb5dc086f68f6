#!/usr/bin/env bash
# The main job: set-up (idempotent), build, then run lspo's headline example.
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
log "running the CPU Adam benchmark (quick mode)"
exec "$PY" "$ROOT/benchmarks/cpu_adam.py" --quick "$@"
