# Sourced by demo.sh and test.sh: installs what is missing (idempotent, fast when nothing is),
# then builds lspo incrementally into $LSPO_BUILD_DIR. Sets $PY to the project's Python.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { printf '\033[1m[lspo]\033[0m %s\n' "$*" >&2; }

# 1. system packages
need_pkgs=()
for p in cmake ninja-build g++ ccache libgtest-dev libgmock-dev libbenchmark-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
command -v python3 >/dev/null || need_pkgs+=(python3 python3-venv python3-dev)
if ((${#need_pkgs[@]})); then
  log "installing system packages: ${need_pkgs[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# 2. the virtual environment, with torch pinned (requirements.txt)
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.lspo-requirements"
want=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python requirements (first run downloads PyTorch, a few GB)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -r requirements.txt
  "$PY" -m pip install -q --no-deps -r requirements-nodeps.txt
  echo "$want" > "$stamp"
fi

# 3. build (incremental) and make the package importable from the venv (development install)
LSPO_BUILD_DIR=${LSPO_BUILD_DIR:-$ROOT/build}
if command -v ccache >/dev/null; then
  # compiler cache shared by every checkout of this machine (paths are hashed relative to ROOT)
  # (CMake reads CMAKE_<LANG>_COMPILER_LAUNCHER from the environment: the wheel build uses it too)
  export CCACHE_BASEDIR="$ROOT" CCACHE_NOHASHDIR=1
  export CMAKE_CXX_COMPILER_LAUNCHER=ccache CMAKE_CUDA_COMPILER_LAUNCHER=ccache
fi
if [ ! -f "$LSPO_BUILD_DIR/build.ninja" ]; then
  log "configuring $LSPO_BUILD_DIR"
  cmake -S "$ROOT" -B "$LSPO_BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython3_EXECUTABLE="$PY" -DLSPO_INPLACE_EXT=ON ${LSPO_CMAKE_ARGS:-} >/dev/null
fi
log "building ($LSPO_BUILD_DIR)"
if ! cmake --build "$LSPO_BUILD_DIR" -j "${LSPO_JOBS:-$(nproc)}" > "$LSPO_BUILD_DIR/build.log" 2>&1; then
  grep -v '^\[' "$LSPO_BUILD_DIR/build.log" | tail -80
  log "build failed (full log: $LSPO_BUILD_DIR/build.log)"
  exit 1
fi
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$ROOT/python" > "$site/lspo-dev.pth"
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PY LSPO_BUILD_DIR ROOT
