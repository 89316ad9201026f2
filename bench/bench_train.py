"""Training throughput and memory of QLoRA on the CPU (issue 8): `qlora train` vs a Python loop with transformers + PEFT
+ bitsandbytes vs a Python loop with transformers and qlora's Python layers, on the same model, data and settings,
with the fraction of the 6·P FLOP-per-token roofline each reaches and a profile of where `qlora train`'s step goes.

    .venv/bin/python bench/bench_train.py [--steps 6] [--dtypes fp32,bf16] [--quick] [--out bench/results/train.json]

The benchmark writes a small Llama with realistic shapes (hidden 768, 12 layers, 12 heads, 4 key/value heads,
intermediate 2048, vocabulary 32000: 125 M parameters; transformers' random init, float32) and a text dataset (the
bundled KJV verses, joined into 512-token rows with the bundled tokenizer; `qlora preprocess --dump` gives the Python
loops the very rows `qlora train` sees). Every system trains QLoRA: NF4 (double quantization) on the seven projections
of every layer, LoRA r 16 / alpha 32 (float32 LoRA weights), sequence 512, micro-batch 1, no accumulation, paged 8-bit
AdamW (qlora's, or bitsandbytes' for the bitsandbytes loop), lr 2e-4, activation checkpointing on and off, 1 and 2
threads, float32 and bfloat16 compute (bitsandbytes: `bnb_4bit_compute_dtype` and the model's dtype; qlora: `bf16`).
Each run is a fresh process; peak RSS is its VmHWM. Tokens/s leave out the first step (first touch of the memory);
the loss reported is the mean of the last three steps.

Roofline: the benchmark times the model's own matmuls (512 tokens x every projection and the LM head, forward
shapes) in each dtype and thread count, giving the machine's GEMM rate R in FLOP/s; with P the parameters of those
matrices (the embedding does no matmul), 6·P FLOP per token is the usual training cost (forward 2P, backward 4P), so
R / 6P tokens/s is the roofline and a system's fraction is its tokens/s over that.

Profile: one more `qlora train --profile` run per dtype (1 thread, checkpointing on, steps 2-3) records the share of
the step in matmuls, attention, qlora's NF4 ops, the optimizer and the rest.

Validation before the numbers count: each system's losses are finite, and the first step's loss of every system is
within 2 % of qlora's in the same dtype (same random model and LoRA start, B = 0, so the first forward is the NF4
base's; a random model's loss is near ln V on any row, so this catches a wrong model, label shift or loss
normalisation, not a different row order: the Python loops take the dumped rows in file order, `qlora train` in its
seeded order). The GEMM timings check one product against a float64 one first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import qlora  # noqa: E402,F401
from bench_nf4_quant import machine, median_time  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QLORA = os.path.join(REPO, "build", "bin", "qlora")
TOKENIZER = os.path.join(REPO, "models", "tiny-kjv", "tokenizer.model")
MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2)
QUICK = dict(MODEL, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# One Python training run in a fresh process: argv = system, model dir, rows.jsonl, steps, threads, checkpointing,
# compute dtype (fp32 | bf16).
PY_LOOP = r'''
import json, sys, time
import torch, transformers
system, model_dir, rows, steps, threads, ckpt, dtype = sys.argv[1:8]
steps, threads, ckpt = int(steps), int(threads), ckpt == "1"
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
torch.set_num_threads(threads)
torch.manual_seed(0)
data = [json.loads(l) for l in open(rows)]
if system == "bitsandbytes":
    import bitsandbytes as bnb, peft
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=dtype)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                       task_type="CAUSAL_LM"))
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
else:
    from qlora.nn import replace_linear_with_qlora
    from qlora.optim import PagedAdamW8bit
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    replace_linear_with_qlora(model, TARGETS, r=16, lora_alpha=32)
    opt = PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model.train()
out = []
t0 = time.perf_counter()
for step in range(steps):
    row = data[step % len(data)]
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor([row["labels"]])
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    out.append({"step": step + 1, "loss": loss.item(), "elapsed_s": time.perf_counter() - t0, "tokens": ids.numel()})
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
print(json.dumps({"steps": out, "peak_rss_bytes": peak}))
'''.replace("TARGETS", repr(TARGETS))


def summarize(steps: list[dict], peak: int) -> dict:
    later = steps[1:]
    seconds = later[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    return {"tokens_per_second": sum(s["tokens"] for s in later) / seconds, "peak_rss_bytes": peak,
            "first_loss": steps[0]["loss"], "final_loss": sum(s["loss"] for s in steps[-3:]) / len(steps[-3:]),
            "losses": [s["loss"] for s in steps]}


def qlora_config(tmp: str, model: str, data: str, steps: int, threads: int, ckpt: bool, dtype: str) -> str:
    out = os.path.join(tmp, f"qlora-{threads}-{int(ckpt)}-{dtype}")
    shutil.rmtree(out, ignore_errors=True)
    config = out + ".yaml"
    with open(config, "w") as f:
        f.write(f"base_model: {model}\ntokenizer: {TOKENIZER}\nadapter: qlora\nload_in_4bit: true\nlora_r: 16\n"
                f"lora_alpha: 32\nlora_dropout: 0.0\nlora_target_linear: true\ndatasets:\n  - path: {data}\n"
                f"    type: text\nval_set_size: 0\nsequence_len: 512\nsample_packing: false\nmicro_batch_size: 1\n"
                f"gradient_accumulation_steps: 1\nmax_steps: {steps}\noptimizer: paged_adamw_8bit\n"
                f"lr_scheduler: constant\nlearning_rate: 2.0e-4\nweight_decay: 0.0\nmax_grad_norm: 0.0\n"
                f"gradient_checkpointing: {str(ckpt).lower()}\nbf16: {str(dtype == 'bf16').lower()}\nseed: 0\n"
                f"shuffle_merged_datasets: false\nlogging_steps: 1\nsave_steps: 100000\nnum_threads: {threads}\n"
                f"output_dir: {out}\n")
    return config


def run_qlora(tmp: str, model: str, data: str, steps: int, threads: int, ckpt: bool, dtype: str) -> dict:
    config = qlora_config(tmp, model, data, steps, threads, ckpt, dtype)
    subprocess.run([QLORA, "train", config], check=True, capture_output=True, text=True)
    out = config[:-len(".yaml")]
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in x]
    steps_ = [{"step": r["step"], "loss": r["loss"], "elapsed_s": r["elapsed_s"],
               "tokens": r["tokens_seen"] - (rows[i - 1]["tokens_seen"] if i else 0)} for i, r in enumerate(rows)]
    return summarize(steps_, max(r["peak_rss_bytes"] for r in rows))


def run_python(system: str, model: str, rows: str, steps: int, threads: int, ckpt: bool, dtype: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PY_LOOP, system, model, rows, str(steps), str(threads), str(int(ckpt)),
                        dtype], check=True, capture_output=True, text=True)
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    return summarize(doc["steps"], doc["peak_rss_bytes"])


def profile_qlora(tmp: str, model: str, data: str, dtype: str) -> dict:
    """`qlora train --profile` over steps 2-3 (1 thread, checkpointing on): phases, categories, top operators."""
    config = qlora_config(tmp, model, data, 3, 1, True, dtype)
    prof = os.path.join(tmp, f"profile-{dtype}")
    subprocess.run([QLORA, "train", config, "--profile", prof, "--profile-steps", "2"], check=True,
                   capture_output=True, text=True)
    doc = json.load(open(os.path.join(prof, "ops.json")))
    shares = {k: v["self_share"] for k, v in doc["categories"].items()}
    assert abs(sum(shares.values()) - 1.0) < 1e-6, shares  # the categories partition the profiled wall time
    top = [{k: o[k] for k in ("name", "category", "calls", "self_s", "self_share")}
           for o in doc["ops"] if o["category"] != "user"][:8]
    return {"steps": doc["steps"], "tokens": doc["tokens"], "wall_s": doc["wall_s"],
            "phases": {k: v["share"] for k, v in doc["phases"].items()}, "categories": shares, "top_ops": top}


def gemm_rate(cfg: dict, dtype: torch.dtype, threads: int) -> dict:
    """The machine's GEMM rate at the model's own forward shapes (512 tokens), FLOP-weighted over one layer's seven
    projections and the LM head, and P, the parameters of the matrices a token's forward multiplies by."""
    torch.set_num_threads(threads)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    layer = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out) of q k v o gate up down
    shapes = [(s, cfg["num_hidden_layers"]) for s in layer] + [((h, v), 1)]
    n_tok, flops, seconds = 512, 0.0, 0.0
    g = torch.Generator().manual_seed(0)
    for (k, n), count in shapes:
        x = torch.randn(n_tok, k, generator=g).to(dtype)
        w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
        y = x @ w.t()
        ref = x.double() @ w.double().t()  # the same (already rounded) inputs, exact products and sums
        # Bound per element: float32 accumulation of k products, k * 2^-24 * sum |x_i w_i| (the worst-case
        # summation error), plus, for a bfloat16 result, its final rounding, 2^-8 * |y|. A wrong GEMM is far outside.
        bound = k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())
        if dtype == torch.bfloat16:
            bound += 2.0 ** -8 * ref.abs()
        assert ((y.double() - ref).abs() <= bound).all(), ("GEMM check", k, n, dtype)
        t = median_time(lambda: x @ w.t(), repeat=7)
        flops += 2.0 * n_tok * k * n * count
        seconds += t * count
    params = sum(k * n * count for (k, n), count in shapes)
    return {"flops_per_s": flops / seconds, "matmul_parameters": params}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtypes", default="fp32,bf16", help="compute dtypes, comma-separated: fp32, bf16")
    ap.add_argument("--quick", action="store_true", help="a 2-layer model, 1 thread, checkpointing off (a smoke run)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "train.json"))
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {d!r}, expected fp32 or bf16")
    import transformers
    cfg = QUICK if args.quick else MODEL
    threads_grid = (1,) if args.quick else (1, 2)
    rates = {f"{d}-{t}": gemm_rate(cfg, DTYPES[d], t) for d in dtypes for t in threads_grid}
    for k, r in rates.items():
        print(f"GEMM {k}: {r['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(model)
        verses = [json.loads(x) for x in open(os.path.join(REPO, "data", "tiny-kjv", "verses.jsonl"))]
        text = " ".join(v["input"] + " " + v["output"] for v in verses)
        data = os.path.join(tmp, "data.jsonl")
        with open(data, "w") as f:  # rows of about 3,000 characters: more than 512 tokens each, truncated to 512
            for i in range(0, len(text) - 3000, 3000):
                f.write(json.dumps({"text": text[i:i + 3000]}) + "\n")
        config = os.path.join(tmp, "pre.yaml")
        with open(config, "w") as f:
            f.write(f"base_model: {model}\ntokenizer: {TOKENIZER}\nadapter: qlora\nlora_target_linear: true\n"
                    f"datasets:\n  - path: {data}\n    type: text\nval_set_size: 0\nsequence_len: 512\n"
                    f"output_dir: {tmp}/pre\n")
        rows = os.path.join(tmp, "rows.jsonl")
        subprocess.run([QLORA, "preprocess", config, "--dump", rows], check=True, capture_output=True)
        n_rows = sum(1 for _ in open(rows))
        assert all(len(json.loads(x)["input_ids"]) == 512 for x in open(rows)), "rows must be 512 tokens"
        cases = []
        grid = [(1, False, d) for d in dtypes] if args.quick else \
            [(t, c, d) for d in dtypes for t in threads_grid for c in (True, False)]
        for threads, ckpt, dtype in grid:
            case = {"threads": threads, "gradient_checkpointing": ckpt, "dtype": dtype, "systems": {}}
            case["systems"]["qlora_train"] = run_qlora(tmp, model, data, args.steps, threads, ckpt, dtype)
            case["systems"]["transformers_peft_bnb"] = run_python("bitsandbytes", model, rows, args.steps, threads,
                                                                  ckpt, dtype)
            case["systems"]["transformers_qlora_nn"] = run_python("qlora", model, rows, args.steps, threads, ckpt,
                                                                  dtype)
            ref = case["systems"]["qlora_train"]
            for name, s in case["systems"].items():
                assert all(torch.isfinite(torch.tensor(s["losses"]))), (name, s["losses"])
                assert abs(s["first_loss"] - ref["first_loss"]) <= 0.02 * ref["first_loss"], (name, s, ref)
            b = case["systems"]["transformers_peft_bnb"]
            rate = rates[f"{dtype}-{threads}"]
            roofline = rate["flops_per_s"] / (6 * rate["matmul_parameters"])
            case["roofline_tokens_per_second"] = roofline
            for s in case["systems"].values():
                s["tokens_per_second_vs_bnb"] = s["tokens_per_second"] / b["tokens_per_second"]
                s["peak_rss_vs_bnb"] = s["peak_rss_bytes"] / b["peak_rss_bytes"]
                s["roofline_fraction"] = s["tokens_per_second"] / roofline
            cases.append(case)
            print(json.dumps({"threads": threads, "ckpt": ckpt, "dtype": dtype, **{k: {kk: round(vv, 3) for kk, vv in
                  v.items() if kk != "losses"} for k, v in case["systems"].items()}}), flush=True)
        profiles = {d: profile_qlora(tmp, model, data, d) for d in dtypes}
    doc = {"machine": machine(), "model": {**cfg, "parameters": sum(
        p.numel() for p in transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).parameters())},
           "steps": args.steps, "rows": n_rows,
           "gemm": {k: {"gflops": r["flops_per_s"] / 1e9, "matmul_parameters": r["matmul_parameters"]}
                    for k, r in rates.items()},
           "cases": cases, "profiles": profiles}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
