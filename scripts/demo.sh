#!/usr/bin/env bash
# The main job: set-up (idempotent), build, then fine-tune a real pretrained LLM with lspo.
#   ./scripts/demo.sh [finetune_lm.py flags]   SmolLM2-135M-Instruct on tinyshakespeare (examples/finetune_lm.py)
#   ./scripts/demo.sh --bench [flags]          the CPU Adam benchmark (quick mode) instead
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
if [ "${1:-}" = "--bench" ]; then
  shift
  log "running the CPU Adam benchmark (quick mode)"
  exec "$PY" "$ROOT/benchmarks/cpu_adam.py" --quick "$@"
fi
log "fine-tuning a pretrained LLM (examples/finetune_lm.py; --help for options)"
exec "$PY" "$ROOT/examples/finetune_lm.py" "$@"
