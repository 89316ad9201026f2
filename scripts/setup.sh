#!/usr/bin/env bash
# scripts/setup.sh: everything a fresh Debian machine needs to build and test qlora, and the builds themselves.
# Idempotent; a second run only rebuilds what changed (ninja + ccache).
#
#   1. Debian packages (compilers, CMake, ninja, ccache, GoogleTest and the libraries of the trainer).
#   2. .venv/ with torch==2.14.1 (installed from local disk) and the test-only packages of requirements-test.txt.
#   3. The CMake build in build/ (operator library, C++ tests and examples; binaries in build/bin/).
#   4. The Python extension qlora/_C built by setup.py (torch.utils.cpp_extension) into python/qlora/, and python/ on
#      the venv's path (equivalent to `pip install --no-build-isolation -e .`, which also works).
#
# Environment: QLORA_BUILD_CUDA=0 skips the CUDA kernels; TORCH_CUDA_ARCH_LIST (default "8.0;9.0");
# QLORA_WERROR=ON turns warnings into errors (CI); JOBS (default: number of cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
jobs=${JOBS:-$(nproc)}
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. Debian packages --------------------------------------------------------------------------------------------
apt_packages=(build-essential cmake ninja-build ccache git python3-venv clang-format
  pkg-config libyaml-cpp-dev libsentencepiece-dev nlohmann-json3-dev libgtest-dev libbenchmark-dev libcli11-dev libfmt-dev)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. Python environment ------------------------------------------------------------------------------------------
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($python --version)"
  $python -m venv .venv
fi
want="torch==2.14.1 $(sha256sum requirements-test.txt | cut -c1-16)"
if [ "$(cat .venv/.qlora-deps 2>/dev/null)" != "$want" ]; then
  log "installing torch==2.14.1 and the test packages into .venv"
  .venv/bin/pip install -q --upgrade pip setuptools wheel
  .venv/bin/pip install -q torch==2.14.1 -r requirements-test.txt
  echo "$want" > .venv/.qlora-deps
fi

# 3. CMake build --------------------------------------------------------------------------------------------------
# ccache keys on paths relative to the checkout, so clones in other directories share one cache.
export CCACHE_BASEDIR=$root CCACHE_NOHASHDIR=true
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
cuda_flag=()
[ "${QLORA_BUILD_CUDA:-}" = "0" ] && cuda_flag=(-DQLORA_BUILD_CUDA=OFF)
torch_prefix=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
mkdir -p build
log "configuring CMake in build/"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch_prefix" \
    -DQLORA_BUILD_EXAMPLES=ON -DQLORA_WERROR="${QLORA_WERROR:-OFF}" "${cuda_flag[@]}" >build/configure.log 2>&1 ||
  { cat build/configure.log; exit 1; }
log "building (CMake, $jobs jobs)"
cmake --build build -j "$jobs" >build/build.log 2>&1 || { grep -E -A20 'FAILED|error' build/build.log | head -80; exit 1; }

# 4. Python extension (setup.py) ----------------------------------------------------------------------------------
export PATH=/usr/lib/ccache:$PATH
export PYTORCH_NVCC="ccache $CUDA_HOME/bin/nvcc"
export MAX_JOBS=$jobs
log "building the Python extension (setup.py build_ext --inplace)"
.venv/bin/python setup.py -q build_ext --inplace >build/setuptools.log 2>&1 || { cat build/setuptools.log; exit 1; }
# Put python/ on the venv's path (what an editable install does, without rebuilding in a temporary directory).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$root/python" > "$site/qlora-dev.pth"
.venv/bin/python -c 'import qlora, torch; print("[setup] qlora ready:", qlora.LIBRARY_PATH, "| CPU ISA:", torch.ops.qlora.cpu_isa())'
