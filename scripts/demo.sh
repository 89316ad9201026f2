#!/usr/bin/env bash
# scripts/demo.sh: the README's main job. Sets up (scripts/setup.sh), then runs qlora's examples:
# NF4 quantization from Python (torch.ops.qlora) and from a C++ program linked against the qlora::ops library.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
echo
echo "== Python: examples/nf4_python/quantize.py"
.venv/bin/python examples/nf4_python/quantize.py
echo
echo "== C++: examples/cpp_ops (build/bin/qlora_cpp_ops_example)"
build/bin/qlora_cpp_ops_example
