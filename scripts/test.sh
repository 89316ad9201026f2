#!/usr/bin/env bash
# scripts/test.sh: set up (scripts/setup.sh) and run every test: C++ (ctest: core, cpu, cuda, package) and Python
# (pytest). CUDA tests skip on a machine without a GPU and say so.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
echo "[test] C++ tests (ctest)"
ctest --test-dir build --output-on-failure -j "${JOBS:-$(nproc)}"
echo "[test] Python tests (pytest)"
QLORA_REQUIRE_CMAKE_BUILD=1 .venv/bin/python -m pytest -p no:cacheprovider tests/python "$@"
