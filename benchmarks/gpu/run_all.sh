#!/usr/bin/env bash
# One device call: build lspo with CUDA (or take the extension call 1 built), run the CUDA tests, then
# the selected benchmarks (benches.sh), all under one deadline, every step under `timeout`, results
# collected into $OUT after every step (so a call cut short still returns what it measured).
# benchmarks/gpu/README.md says how to split the run into two calls and what each one costs.
#
#   LSPO_GPU_STAGES    which stages: "build tests bench" (default: all)
#   LSPO_GPU_BENCH     which benches: names and tags of benches.sh (default: all)
#   LSPO_GPU_DEADLINE  seconds from the start: no step runs past it, a bench expected to need more
#                      than what is left is skipped (default 480)
#   LSPO_GPU_CARRY     the carried folder (default .gpu-carry, made by prepare_carry.sh): COMMIT stamp,
#                      whl/ (wheels), gtest/ (GoogleTest), prebuilt/ (call 1's extension, for call 2)
#   LSPO_GPU_BENCHES   the bench list to source (default benchmarks/gpu/benches.sh)
#   LSPO_JOBS          build jobs (default: nproc);  LSPO_CUDA_ARCH (default 90);
#   LSPO_GPU_BUILD_LIMIT  timeout of the build stage (default 360 s, never past the deadline)
# $OUT (default ./gpu-out) receives at most 7 files: env.json, stages.jsonl, bench.jsonl, results.json,
# table.md, log.txt and, after a build, prebuilt.tar.gz (the extension + its commit).
set -uo pipefail
T0=$(date +%s)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
export OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
STAGES=${LSPO_GPU_STAGES:-build tests bench}
DEADLINE=${LSPO_GPU_DEADLINE:-480}
CARRY=${LSPO_GPU_CARRY:-$ROOT/.gpu-carry}
BENCHES=${LSPO_GPU_BENCHES:-$ROOT/benchmarks/gpu/benches.sh}
BUILD=$ROOT/build-gpu
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
COL=("$PY" "$ROOT/benchmarks/gpu/collect.py")

left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
has() { [[ " $STAGES " == *" $1 "* ]]; }
summary=()
note() { echo "== $*"; summary+=("$*"); }

# optional peers (torchao, DeepSpeed) and test needs (gguf) travel as wheels
if ls "$CARRY"/whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$CARRY"/whl/*.whl >> "$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"${COL[@]}" env "$OUT" --carry "$CARRY" || { echo "collect.py env failed"; exit 1; }
env_get() { "$PY" -c "import json,sys; v = json.load(open(sys.argv[1])).get(sys.argv[2]); print('' if v is None else v)" "$OUT/env.json" "$1"; }
COMMIT=$(env_get commit)

# stage NAME LIMIT_S FUNCTION: the function under `timeout` (never past the deadline), logged, recorded
stage() {
  local name=$1 limit=$2 fn=$3 rem t t0 rc
  rem=$(left)
  t=$(( limit < rem ? limit : rem ))
  if (( t <= 0 )); then
    "${COL[@]}" stage "$OUT" "$name" --rc 124 --text "not started: deadline reached"
    note "$name: not started (deadline)"
    return 124
  fi
  t0=$(date +%s)
  echo "==== stage $name (limit $t s)" >> "$LOG"
  timeout -k 10 "$t" bash -c "$fn" > "$TMP/stage.log" 2>&1
  rc=$?
  cat "$TMP/stage.log" >> "$LOG"
  local text
  text=$(grep -E "RESULT|tests passed|tests failed|[0-9]+ (passed|failed|errors?|skipped|deselected)" "$TMP/stage.log" | tail -1)
  (( rc == 124 || rc == 137 )) && text="timeout after $t s $text"
  "${COL[@]}" stage "$OUT" "$name" --rc "$rc" --wall $(( $(date +%s) - t0 )) --text "$text"
  note "$name: rc=$rc in $(( $(date +%s) - t0 )) s $text"
  (( rc != 0 )) && tail -30 "$TMP/stage.log"
  return $rc
}

# ---------------------------------------------------------------- build
do_build() {
  set -e
  local gt tests=OFF
  gt=$(ls -d "$CARRY"/gtest/root/usr/lib/*/cmake/GTest 2>/dev/null | head -1 || true)
  if [ -n "$gt" ] || ls -d /usr/lib/*/cmake/GTest /usr/local/lib*/cmake/GTest >/dev/null 2>&1; then tests=ON; fi
  echo "GoogleTest: ${gt:-system or none} -> LSPO_BUILD_TESTS=$tests"
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(command -v "$PY")" \
    -DLSPO_WITH_CUDA=ON -DLSPO_CUDA_ARCHITECTURES="${LSPO_CUDA_ARCH:-90}" -DLSPO_INPLACE_EXT=ON \
    -DLSPO_BUILD_BENCHMARKS=OFF -DLSPO_BUILD_TESTS=$tests ${gt:+-DGTest_DIR=$gt}
  cmake --build "$BUILD" -j "${LSPO_JOBS:-$(nproc)}"
}
use_prebuilt() {  # call 2: the extension call 1 built from the same, verified tree
  set -e
  local want
  want=$(cat "$CARRY/prebuilt/COMMIT")
  [ "$(env_get tree_verified)" = True ] && [ "$want" = "$COMMIT" ] || {
    echo "prebuilt extension is for '$want', this tree is '$COMMIT' (verified: $(env_get tree_verified))"; exit 1; }
  cp "$CARRY"/prebuilt/_C*.so "$ROOT/python/lspo/"
  echo "RESULT: prebuilt extension of $want"
}
check_cuda() { "$PY" -c "import lspo, sys; print('RESULT: lspo.with_cuda =', lspo.with_cuda); sys.exit(0 if lspo.with_cuda else 3)"; }
export -f do_build use_prebuilt check_cuda env_get
export ROOT BUILD CARRY PY COMMIT OUT

if has build; then
  # (not when the C++ tests are to run: they need the build tree)
  if ! has tests && [ -f "$CARRY/prebuilt/COMMIT" ] && stage prebuilt 30 use_prebuilt; then
    :
  else
    stage build "${LSPO_GPU_BUILD_LIMIT:-360}" do_build || { cat "$OUT/table.md" 2>/dev/null; exit 1; }
    # for call 2: the extension (debug info stripped) and the commit it was built from
    mkdir -p "$TMP/pre"
    cp python/lspo/_C*.so "$TMP/pre/" && strip --strip-debug "$TMP"/pre/_C*.so 2>/dev/null
    echo "$COMMIT" > "$TMP/pre/COMMIT"
    tar -czf "$OUT/prebuilt.tar.gz" -C "$TMP/pre" . && \
      note "prebuilt.tar.gz: $(( $(stat -c %s "$OUT/prebuilt.tar.gz") / 1024 )) KiB (commit $COMMIT)"
  fi
  stage cuda-check 60 check_cuda || { cat "$OUT/table.md"; exit 1; }
fi

# ---------------------------------------------------------------- tests: the CUDA ones only (CI runs the rest)
do_ctest() {
  [ -x "$BUILD/lspo_tests" ] || { echo "RESULT: no lspo_tests (GoogleTest not carried)"; exit 0; }
  ctest --test-dir "$BUILD" -R Cuda --output-on-failure -j4
}
do_pytest() { "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda "$ROOT/tests/python"; }
export -f do_ctest do_pytest
if has tests; then
  stage ctest-cuda 120 do_ctest
  stage pytest-cuda 180 do_pytest
fi

# ---------------------------------------------------------------- benchmarks
run_bench() {  # NAME TAGS EST_S LIMIT_S COMMAND...
  local name=$1 tags=$2 est=$3 limit=$4 rem t t0 rc wall
  shift 4
  rem=$(left)
  if (( rem < est )); then
    note "$("${COL[@]}" add "$OUT" "$name" --tags "$tags" --skipped "needs ~$est s, $rem s left before the deadline")"
    return 0
  fi
  t=$(( limit < rem ? limit : rem ))
  t0=$(date +%s)
  timeout -k 10 "$t" "$@" > "$TMP/stdout" 2> "$TMP/stderr"
  rc=$?
  wall=$(( $(date +%s) - t0 ))
  { echo "==== bench $name: rc=$rc, $wall s (limit $t s): $*"; cat "$TMP/stdout"; echo "---- stderr";
    tail -c 20000 "$TMP/stderr"; } >> "$LOG"
  note "$("${COL[@]}" add "$OUT" "$name" --rc $rc --wall $wall --limit $t --tags "$tags" \
          --stdout "$TMP/stdout" --stderr "$TMP/stderr")"
}
if has bench; then
  # shellcheck source=benches.sh
  source "$BENCHES"
fi

echo
echo "================ summary ($(( $(date +%s) - T0 )) s of $DEADLINE)"
printf '%s\n' "${summary[@]}"
echo
cat "$OUT/table.md"
