"""Greedy generation from a TorchScript archive written by `qlora export`, with nothing but stock PyTorch and the
sentencepiece tokenizer: qlora itself is not imported.

    .venv/bin/python examples/end_to_end/generate.py --model build/examples/end_to_end/model.pt \
        --tokenizer models/tiny-kjv/tokenizer.model --input "In the beginning God"

The prompt is the Alpaca template the adapter was trained with (`qlora generate --alpaca` builds the same text).
Each step runs the whole sequence through the archive's forward (TorchScript takes input_ids, returns logits), so this
is for short generations; `qlora generate` has a key/value cache.
"""

import argparse
import sys
import warnings

import sentencepiece
import torch

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. Write a "
          "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n"
          "{input}\n\n### Response:\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="TorchScript archive (qlora export --format torchscript)")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece model of the base model")
    ap.add_argument("--instruction", default="Complete the verse from the King James Bible.")
    ap.add_argument("--input", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in torch 2.14 (still supported)
    model = torch.jit.load(args.model).eval()
    sp = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer)
    ids = [sp.bos_id()] + sp.encode(ALPACA.format(instruction=args.instruction, input=args.input))
    out = []
    with torch.no_grad():
        for _ in range(args.max_new_tokens):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == sp.eos_id():
                print(sp.decode(out) + " [EOS]")
                break
            out.append(nxt)
        else:
            print(sp.decode(out))
    assert "qlora" not in sys.modules, "this example must run on stock PyTorch alone"
    return 0


if __name__ == "__main__":
    sys.exit(main())
