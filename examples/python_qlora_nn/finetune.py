"""QLoRA fine-tuning of a transformers Llama from Python with qlora.nn, then adapter save, reload and hot-swap.

    .venv/bin/python examples/python_qlora_nn/finetune.py [--steps 30] [--out DIR] [--model DIR] [--lr 1e-2]
                                                          [--threads N]

1. Builds a small random LlamaForCausalLM (or loads --model DIR, a local transformers checkpoint).
2. ``replace_linear_with_qlora`` turns its seven projections into NF4 + LoRA layers (torch.ops.qlora.linear).
3. Fine-tunes the LoRA matrices with ``qlora.optim.PagedAdamW8bit`` on synthetic text (16 tokens repeated in a
   fixed order, so each token predicts the next) and prints the loss as it falls.
4. Saves the adapter in PEFT's format (``save_peft_adapter``), loads it into a freshly converted model
   (``load_peft_adapter``) and checks that its logits equal the trained model's bit for bit; then switches the
   adapter off and on again (``set_active_adapter``) to show the base model's loss next to the fine-tuned one.

Exits 1 if the reloaded logits differ. Uses torch, transformers and qlora only (no peft, no safetensors package).
"""

import argparse
import os
import time

import torch
import transformers

import qlora
from qlora.nn import (
    load_peft_adapter,
    replace_linear_with_qlora,
    save_peft_adapter,
    set_active_adapter,
    trainable_parameters_report,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
kLoraR = 8  # LoRA rank of every projection
kLoraAlpha = 16  # scale lora_alpha / r = 2
kBatch = 8  # sequences per step
kSeqLen = 32  # tokens per sequence
kCycle = 16  # the synthetic text cycles through kCycle tokens in a fixed order


def base_model(model_dir):
    """The dense model: --model's checkpoint, or a small random Llama (the same one on every call: fixed seed)."""
    if model_dir:
        return transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=kSeqLen, initializer_range=0.2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def converted(model_dir):
    return replace_linear_with_qlora(base_model(model_dir), TARGETS, r=kLoraR, lora_alpha=kLoraAlpha)


def pattern_batch(cycle, generator):
    """kBatch sequences of the token cycle ``cycle`` (a fixed order of kCycle tokens), each from a random point:
    every next token follows from the current one, so the loss can fall far below log(vocab_size)."""
    starts = torch.randint(0, len(cycle), (kBatch, 1), generator=generator)
    return cycle[(starts + torch.arange(kSeqLen)) % len(cycle)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    ap.add_argument("--out", default=os.path.join(REPO, "build", "examples", "python_qlora_nn", "adapter"),
                    help="where the PEFT adapter is written (default build/examples/python_qlora_nn/adapter)")
    ap.add_argument("--model", default=None, help="a local transformers Llama directory (default: a random tiny one)")
    ap.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default 1 for the built-in tiny model, whose ops are too small to split; "
                         "torch's default with --model)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    threads = args.threads if args.threads is not None else (None if args.model else 1)
    if threads is not None:
        torch.set_num_threads(threads)

    t0 = time.perf_counter()
    model = converted(args.model)
    vocab = model.config.vocab_size
    print(f"model: {'random tiny Llama' if not args.model else args.model}, CPU kernels {torch.ops.qlora.cpu_isa()}, "
          f"threads {torch.get_num_threads()}")
    print(trainable_parameters_report(model))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = qlora.optim.PagedAdamW8bit(params, lr=args.lr, weight_decay=0.0)
    cycle = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:kCycle]
    data = torch.Generator().manual_seed(2)
    held_out = pattern_batch(cycle, torch.Generator().manual_seed(3))
    model.train()
    losses = []
    for step in range(1, args.steps + 1):
        ids = pattern_batch(cycle, data)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {losses[-1]:.4f}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps")

    model.eval()
    with torch.no_grad():
        trained = model(input_ids=held_out).logits
    save_peft_adapter(model, args.out, base_model_name_or_path=args.model or "")
    print(f"saved the adapter to {args.out}: {', '.join(sorted(os.listdir(args.out)))}")

    fresh = converted(args.model).eval()  # the same NF4 bytes: quantization is deterministic
    load_peft_adapter(fresh, "finetuned", args.out)
    set_active_adapter(fresh, "finetuned")
    with torch.no_grad():
        reloaded = fresh(input_ids=held_out).logits
        tuned_loss = fresh(input_ids=held_out, labels=held_out).loss.item()
        set_active_adapter(fresh, None)  # hot-swap: the bare NF4 model, nothing re-quantized
        base_loss = fresh(input_ids=held_out, labels=held_out).loss.item()
    print(f"held-out loss: base model {base_loss:.4f}, with the reloaded adapter {tuned_loss:.4f}")
    if not torch.equal(reloaded, trained):
        diff = (reloaded - trained).abs().max().item()
        print(f"FAILED: the reloaded adapter's logits differ from the trained model's (max |diff| {diff:.3g})")
        raise SystemExit(1)
    print("reloaded adapter: logits equal to the trained model's, bit for bit")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
