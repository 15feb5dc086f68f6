#!/usr/bin/env bash
# `pip install .` check: builds the wheel (incrementally, in build/wheel-build), installs it into a
# scratch directory and imports it from there (not from the source tree).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-python3}
out="$ROOT/build/wheelhouse"
rm -rf "$out" "$ROOT/build/wheel-site"
"$PY" -m pip wheel -q --no-build-isolation --no-deps "$ROOT" -w "$out" -C build-dir="$ROOT/build/wheel-build"
"$PY" -m pip install -q --no-deps --target "$ROOT/build/wheel-site" "$out"/lspo-*.whl
cd "$ROOT/build"
PYTHONPATH="$ROOT/build/wheel-site" "$PY" -c "
import lspo, os
assert os.path.dirname(lspo.__file__).endswith('wheel-site/lspo'), lspo.__file__
print('wheel: import OK from', os.path.dirname(lspo.__file__), '- isa', lspo.active_isa())"
