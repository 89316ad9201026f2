#!/usr/bin/env bash
# examples/end_to_end/run.sh [STEPS]: the whole tiny path with the qlora binary, then stock PyTorch:
# train a QLoRA adapter on the bundled tiny Llama -> merge it into the base -> export TorchScript -> load the archive
# in Python (no qlora import) and generate. STEPS (default 120) bounds the fine-tune; OUT (default
# build/examples/end_to_end) is where everything goes. Needs the build of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
steps=${1:-120}
out=${OUT:-build/examples/end_to_end}
rm -rf "$out"
mkdir -p "$out"
echo "== 1. fine-tune ($steps steps)"
build/bin/qlora train configs/tiny/qlora.yaml "max_steps=$steps" "output_dir=$out/run" save_steps=100000 \
  eval_steps=100000 logging_steps=20
echo "== 2. merge"
build/bin/qlora merge --base models/tiny-kjv --adapter "$out/run" --out "$out/merged" --dtype fp32
echo "== 3. export TorchScript"
build/bin/qlora export --format torchscript --model "$out/merged" --out "$out/model.pt"
echo "== 4. generate from Python with stock PyTorch"
for input in "In the beginning God created" "And God said, Let there be light:"; do
  printf '%s -> ' "$input"
  .venv/bin/python examples/end_to_end/generate.py --model "$out/model.pt" \
    --tokenizer models/tiny-kjv/tokenizer.model --input "$input" --max-new-tokens 48
done
