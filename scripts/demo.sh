#!/usr/bin/env bash
# scripts/demo.sh: the README's main job. Sets up (scripts/setup.sh), then fine-tunes the bundled tiny Llama
# (models/tiny-kjv, pretrained by the project on the King James Bible) with QLoRA on the bundled instruction data
# (configs/tiny/qlora.yaml: NF4 base, LoRA r 16 on every projection, paged 8-bit AdamW), and prints generations of the
# base model and of the fine-tuned one for the same prompts: verse completions the fine-tune never saw.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
run=build/runs/tiny-qlora
rm -rf "$run"
echo
echo "== qlora train configs/tiny/qlora.yaml"
build/bin/qlora train configs/tiny/qlora.yaml
instruction="Complete the verse from the King James Bible."
show() { # $1 = input, $2 = the verse's true ending; base model, then base + adapter (greedy)
  echo
  echo "## $instruction"
  echo "## input: $1"
  echo "## KJV:   $2"
  printf 'before: '
  build/bin/qlora generate --model models/tiny-kjv --alpaca "$instruction" --input "$1" --max-new-tokens 64
  printf 'after:  '
  build/bin/qlora generate --model models/tiny-kjv --adapter "$run" --alpaca "$instruction" --input "$1" \
    --max-new-tokens 64
}
echo
echo "== generations (greedy; [EOS] = the model ended its answer)"
field() { printf '%s' "$1" | .venv/bin/python -c "import json,sys; print(json.loads(sys.stdin.read())['$2'])"; }
while IFS= read -r line; do
  show "$(field "$line" input)" "$(field "$line" output)"
done < <(head -n 4 data/tiny-kjv/heldout.jsonl)
