#!/usr/bin/env bash
# scripts/make_tiny_model.sh: rebuilds the bundled tiny model models/tiny-kjv (tokenizer.model, config.json,
# model.safetensors) and data/tiny-kjv/verses.jsonl from the King James Bible of Debian's bible-kjv-text package
# (public domain). Deterministic given the same machine and thread count; ~20 minutes on 2 cores. The README's demo
# does not run this: its outputs are committed.
#
#   1. dump the 31,102 verses with `bible` (package bible-kjv); build the corpus, pretraining passages and verse
#      completions (scripts/tiny_kjv_data.py, standard library only)
#   2. train a 2,048-piece BPE sentencepiece tokenizer (Llama-style: byte fallback, split digits, BOS 1, EOS 2)
#   3. `qlora init` a random 4-layer Llama (models/tiny-kjv/config.json), then `qlora train configs/tiny/pretrain.yaml`
#      (full-parameter training, adapter: none), and copy the result into models/tiny-kjv
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=build/tiny-kjv
mkdir -p "$out"
for p in bible-kjv bible-kjv-text sentencepiece; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="${missing:-} $p"
done
if [ -n "${missing:-}" ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get install -y -qq $missing >/dev/null
fi
bible -f -l100000 "gen1:1-rev22:21" > "$out/kjv.txt"
python3 scripts/tiny_kjv_data.py "$out/kjv.txt" "$out"
spm_train --input="$out/corpus.txt" --model_prefix="$out/tokenizer" --vocab_size=2048 --model_type=bpe \
  --character_coverage=1.0 --byte_fallback=true --split_digits=true --bos_id=1 --eos_id=2 --unk_id=0 --pad_id=-1 \
  --normalization_rule_name=identity --remove_extra_whitespaces=false --allow_whitespace_only_pieces=true \
  --num_threads=1 --minloglevel=2
rm -rf "$out/init"
build/bin/qlora init models/tiny-kjv/config.json "$out/init" --seed 1
build/bin/qlora train configs/tiny/pretrain.yaml "$@"
cp "$out/tokenizer.model" models/tiny-kjv/tokenizer.model
cp "$out/pretrain/model.safetensors" models/tiny-kjv/model.safetensors
mkdir -p data/tiny-kjv
cp "$out/verses.jsonl" data/tiny-kjv/verses.jsonl
cp "$out/heldout.jsonl" data/tiny-kjv/heldout.jsonl
echo "models/tiny-kjv and data/tiny-kjv rebuilt"
