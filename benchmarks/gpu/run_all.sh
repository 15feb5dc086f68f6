#!/usr/bin/env bash
# One call on a GPU machine: build lspo with CUDA, run every C++ and Python test (CUDA ones
# included), then the GPU benchmarks. Logs and JSON go to $OUT (default ./gpu-out); a short table
# is printed last. Designed for the device image (PyTorch 2.11 + CUDA 13, cmake, ninja, pybind11,
# no network): GoogleTest travels as unpacked Debian packages in .gtest/ (see docs/benchmarks.md).
#   LSPO_GPU_STAGES="build tests bench"   which stages to run (default: all)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
STAGES=${LSPO_GPU_STAGES:-build tests bench}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
BUILD=$ROOT/build-gpu
# optional peers (torchao, DeepSpeed) travel as wheels in .whl/ (benchmarks/gpu/prepare_carry.sh)
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$ROOT"/.whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
summary=()
note() { echo "== $*"; summary+=("$*"); }
has() { [[ " $STAGES " == *" $1 "* ]]; }

"$PY" - > "$OUT/env.json" <<'PYEOF'
import json, os, platform, subprocess, torch
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
cpu = ""
try:
    cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
except Exception:
    pass
print(json.dumps({"device": torch.cuda.get_device_name() if p else None,
                  "sm_count": p.multi_processor_count if p else None,
                  "gpu_mem_gib": round(p.total_memory / 2**30, 1) if p else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cpu": cpu, "cpu_count": os.cpu_count(),
                  "commit": os.environ.get("LSPO_COMMIT", "unknown"), "python": platform.python_version()}))
PYEOF
cat "$OUT/env.json"

if has build; then
  GTEST_DIR=$(ls -d "$ROOT"/.gtest/root/usr/lib/*/cmake/GTest 2>/dev/null | head -1)
  t0=$(date +%s)
  { cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(command -v "$PY")" \
      -DLSPO_CUDA_ARCHITECTURES=90 -DLSPO_INPLACE_EXT=ON -DLSPO_BUILD_BENCHMARKS=OFF \
      ${GTEST_DIR:+-DGTest_DIR=$GTEST_DIR} && cmake --build "$BUILD" -j "$(nproc)"; } > "$OUT/build.log" 2>&1
  rc=$?
  note "build: rc=$rc in $(( $(date +%s) - t0 )) s"
  [ $rc = 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
fi

if has tests; then
  ctest --test-dir "$BUILD" --output-on-failure -j4 > "$OUT/ctest.log" 2>&1
  note "ctest: rc=$? $(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1)"
  grep -E "Failed|\*\*\*" "$OUT/ctest.log" | head -20
  "$PY" -m pytest -q -rs "$ROOT/tests/python" > "$OUT/pytest.log" 2>&1
  note "pytest: rc=$? $(tail -1 "$OUT/pytest.log")"
  grep -E "^FAILED|^ERROR|SKIPPED" "$OUT/pytest.log" | head -30
fi

if has bench; then
  : > "$OUT/bench.jsonl"
  run_bench() {  # name, command...
    local name=$1; shift
    local t0=$(date +%s)
    "$@" > "$OUT/bench_$name.log" 2>&1
    local rc=$?
    local last=$(tail -1 "$OUT/bench_$name.log")
    if [ $rc = 0 ] && [[ "$last" == \{* ]]; then
      "$PY" -c "import json,sys; d=json.loads(sys.argv[2]); d['bench']=sys.argv[1]; print(json.dumps(d))" "$name" "$last" >> "$OUT/bench.jsonl"
    fi
    note "bench $name: rc=$rc ($(( $(date +%s) - t0 )) s) ${last:0:300}"
    cat "$OUT/bench_$name.log" >> "$OUT/bench.log"; rm -f "$OUT/bench_$name.log"
  }
  run_bench pcie "$PY" "$ROOT/benchmarks/gpu/pcie.py"
  [ -f "$ROOT/benchmarks/gpu/benches.sh" ] && source "$ROOT/benchmarks/gpu/benches.sh"
fi

[ -f "$OUT/bench.jsonl" ] && "$PY" "$ROOT/benchmarks/gpu/collect.py" "$OUT" > "$OUT/table.md"
echo
echo "================ summary"; cat "$OUT/env.json"
printf '%s\n' "${summary[@]}"
[ -f "$OUT/table.md" ] && cat "$OUT/table.md"
