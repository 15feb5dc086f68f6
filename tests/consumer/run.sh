#!/usr/bin/env bash
# Installs the build in $1 into a scratch prefix, builds tests/consumer and the C++ examples
# (examples/cpp) against it through find_package(lspo), runs them, and checks that both examples
# lower their loss (a few steps each, seconds).
set -euo pipefail
build=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
prefix="$build/consumer-prefix"
rm -rf "$prefix" "$build/consumer-build" "$build/examples-build"
cmake --install "$build" --prefix "$prefix" >/dev/null
torch_prefix=$("${PY:-python3}" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
cmake -S "$here" -B "$build/consumer-build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix;$torch_prefix" >/dev/null
cmake --build "$build/consumer-build" >/dev/null
export LD_LIBRARY_PATH="$prefix/lib:${LD_LIBRARY_PATH:-}"
"$build/consumer-build/consumer"

# examples/cpp: train_tiny (MLP, three optimizers) and finetune_gpt (small GPT, LSPAdamW)
cmake -S "$root/examples/cpp" -B "$build/examples-build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix;$torch_prefix" >/dev/null
cmake --build "$build/examples-build" -j "${LSPO_JOBS:-2}" >/dev/null
check_fell() {  # $1: output, $2: before key, $3: after key -- every RESULT line must show after < before
  local out=$1 n
  n=$(printf '%s\n' "$out" | grep -c '^RESULT' || true)
  [ "$n" -gt 0 ] || { echo "consumer: no RESULT line" >&2; return 1; }
  printf '%s\n' "$out" | grep '^RESULT' | awk -v b="$2" -v a="$3" '{
      for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      if (!(v[a] + 0 < v[b] + 0)) { print "consumer: loss did not fall: " $0 > "/dev/stderr"; bad = 1 }
      else print "consumer: " $0
    } END { exit bad }'
}
# tiny models: one ATen thread (OpenMP's spinning threads on a busy 2-core machine made the same run
# take 30 s instead of 3 s); lspo's own pool keeps LSPO_NUM_THREADS
export OMP_NUM_THREADS=1
out=$("$build/examples-build/train_tiny" --steps 60)
check_fell "$out" loss_before loss_after
out=$("$build/examples-build/finetune_gpt" --data "$root/examples/data/tinyshakespeare.txt" --steps 25 \
      --batch 8 --seq 32 --layers 1 --embd 64 --heads 2 --subspace 32 --nnz 4 --refit-every 10 --eval-every 25)
printf '%s\n' "$out" | grep -v '^RESULT'
check_fell "$out" val_loss_before val_loss_after
