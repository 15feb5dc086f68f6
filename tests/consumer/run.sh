#!/usr/bin/env bash
# Installs the build in $1 into a scratch prefix, builds tests/consumer against it, runs it.
set -euo pipefail
build=$1
here=$(cd "$(dirname "$0")" && pwd)
prefix="$build/consumer-prefix"
rm -rf "$prefix" "$build/consumer-build"
cmake --install "$build" --prefix "$prefix" >/dev/null
torch_prefix=$("${PY:-python3}" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
cmake -S "$here" -B "$build/consumer-build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix;$torch_prefix" >/dev/null
cmake --build "$build/consumer-build" >/dev/null
LD_LIBRARY_PATH="$prefix/lib:${LD_LIBRARY_PATH:-}" "$build/consumer-build/consumer"
