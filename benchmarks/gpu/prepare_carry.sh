#!/usr/bin/env bash
# Run HERE (a machine with network) before a GPU session: fetches what the offline device image
# lacks, into two ignored folders that a `run` call carries (carry: [".gtest", ".whl"]):
#   .gtest/  GoogleTest/GoogleMock unpacked from Debian packages (outside /, as the device README asks)
#   .whl/    py3.12 wheels of the optional peers: torchao, DeepSpeed (+ its pure-Python needs)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
grep -qx '/.gtest/' .git/info/exclude 2>/dev/null || echo /.gtest/ >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .gtest/root .whl
( cd .gtest && apt-get download libgtest-dev libgmock-dev googletest >/dev/null && \
  for f in *.deb; do dpkg -x "$f" root; done )
PY=${PY:-python3}
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
dl() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl "$@"; }
dl torchao==0.18.0 hjson annotated-types typing-inspection pydantic==2.14.3 pydantic-core==2.50.4 ninja py-cpuinfo msgpack
# DeepSpeed publishes only an sdist: build a py3-none-any wheel here (its CPU Adam op JIT-builds there).
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 || echo "deepspeed wheel not built (optional peer)"
du -sh .gtest .whl
