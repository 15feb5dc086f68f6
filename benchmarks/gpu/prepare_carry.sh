#!/usr/bin/env bash
# Run HERE (a machine with network), right before EVERY device call: fills the git-ignored folder
# .gpu-carry/ that the call carries (carry: [".gpu-carry"]) with what the offline device image lacks:
#   COMMIT, FILES, TREEHASH  the commit and a hash of the files that travel (.git does not travel);
#                            rewritten on every run, so run this after your last edit
#   gtest/                   GoogleTest/GoogleMock unpacked from Debian packages (outside /, as the
#                            device README asks); without it the build skips the C++ tests
#   whl/                     py3.12 wheels: gguf (the CUDA fine-tuning test needs it), the optional
#                            peers torchao and DeepSpeed (+ DeepSpeed's pure-Python needs)
#   prebuilt/                (call 2 only) call 1's extension: tar -xzf prebuilt.tar.gz -C .gpu-carry/prebuilt
# Downloads are skipped when already there (LSPO_CARRY_NO_DOWNLOAD=1: stamp only).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
C=.gpu-carry  # git-ignored (.gitignore), so it travels only when carried
git check-ignore -q "$C/COMMIT" || { echo "$C is not git-ignored: it would travel and be stamped"; exit 1; }
mkdir -p "$C/gtest/root" "$C/whl"
PY=${PY:-python3}
if [ -z "${LSPO_CARRY_NO_DOWNLOAD:-}" ]; then
  if [ ! -d "$C/gtest/root/usr" ]; then
    ( cd "$C/gtest" && apt-get download libgtest-dev libgmock-dev googletest >/dev/null && \
      for f in *.deb; do dpkg -x "$f" root; done && rm -f ./*.deb )
  fi
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  dl() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d "$C/whl" "$@"; }
  ls "$C"/whl/gguf-0.19.0-*.whl >/dev/null 2>&1 || dl gguf==0.19.0
  ls "$C"/whl/torchao-*.whl >/dev/null 2>&1 || \
    dl torchao==0.18.0 hjson annotated-types typing-inspection pydantic==2.14.3 pydantic-core==2.50.4 ninja py-cpuinfo msgpack
  # DeepSpeed publishes only an sdist: build a py3-none-any wheel here (its CPU Adam op JIT-builds there).
  # Its setup.py imports torch (no build isolation), and bdist_wheel needs setuptools >= 70.1 or the
  # wheel package: both go to a throwaway folder, the project's venv stays untouched.
  if ! ls "$C"/whl/deepspeed-*.whl >/dev/null 2>&1; then
    bt=$(mktemp -d)
    { "$PY" -m pip install -q --target "$bt" "setuptools>=70.1,<82" wheel && \
      PYTHONPATH="$bt${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pip wheel -q --no-deps --no-build-isolation \
        -w "$C/whl" deepspeed==0.19.8; } || echo "deepspeed wheel not built (optional peer)"
    rm -rf "$bt"
  fi
fi
"$PY" "$ROOT/benchmarks/gpu/collect.py" stamp "$C"
du -sh "$C"
