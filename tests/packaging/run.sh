#!/usr/bin/env bash
# `pip install .` check: builds the wheel with pip (the real scikit-build-core backend and the CMake
# install rules), installs it into a scratch directory and uses it from there (not the source tree).
#
# Cost: the wheel's CMake build recompiles lspo, so it is set up to be served by ccache from the main
# build ($LSPO_BUILD_DIR, default build/; ./scripts/test.sh builds it first):
#  - its build dir, <main build dir>-wheel, sits at the same depth as the main build dir: ccache
#    (CCACHE_BASEDIR) hashes include paths relative to the compiler's working directory;
#  - the same compilers as the main build (scikit-build-core would otherwise set CC/CXX from Python's
#    sysconfig, e.g. g++ where CMake chose c++, and ccache hashes the compiler's name);
#  - the same LSPO_WITH_CUDA as the main build (another value changes every object's flags).
# Then only the link steps run (measured: docs/architecture.md, "Set-up and test time").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-python3}
main_build=${LSPO_BUILD_DIR:-$ROOT/build}
wheel_build="$main_build-wheel"
out="$main_build/wheelhouse" site="$main_build/wheel-site"
rm -rf "$out" "$site"
defines=()
if [ -f "$main_build/CMakeCache.txt" ]; then
  cache() { sed -n "s/^$1:[A-Z]*=//p" "$main_build/CMakeCache.txt"; }
  export CC=$(cache CMAKE_C_COMPILER) CXX=$(cache CMAKE_CXX_COMPILER)
  cuda=$(cache LSPO_WITH_CUDA)
  [ -n "$cuda" ] && defines+=(-C "cmake.define.LSPO_WITH_CUDA=$cuda")
fi
if [ -n "${CCACHE_DISABLE:-}" ] || [ -z "${CMAKE_CXX_COMPILER_LAUNCHER:-}" ]; then
  # (to time a fresh machine, point CCACHE_DIR at an empty folder: CCACHE_DISABLE also stops this reuse)
  echo "packaging: ccache is off (CCACHE_DISABLE set or no compiler launcher): the wheel build compiles lspo again" >&2
fi
"$PY" -m pip wheel -q --no-build-isolation --no-deps "$ROOT" -w "$out" -C build-dir="$wheel_build" "${defines[@]}"
"$PY" -m pip install -q --no-deps --target "$site" "$out"/lspo-*.whl
cd "$main_build"
# the installed package, and not the source tree, is imported; and it works: an lspo operator
# (torch.ops.lspo), the fused CPU Adam and one LSPAdamW step on a small model
PYTHONPATH="$site" "$PY" -c "
import os, torch, lspo
assert os.path.dirname(lspo.__file__) == os.path.join('$site', 'lspo'), lspo.__file__
P = lspo.SparseProjector.random(12, 4, 2, seed=1)
X = torch.randn(3, 12)
torch.testing.assert_close(lspo.projector.right_project(X, P), X @ P.dense())
m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
opt = lspo.LSPAdamW(m, lr=1e-2, subspace=8, nnz=2, min_dim=8)
w0 = m[0].weight.detach().clone()
m(torch.randn(5, 16)).square().mean().backward()
opt.step()
assert not torch.equal(w0, m[0].weight), 'LSPAdamW step changed nothing'
print('wheel: import OK from', os.path.dirname(lspo.__file__), '- isa', lspo.active_isa())"
