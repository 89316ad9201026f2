"""The 7B-shaped QLoRA run (issue 8): a Llama-2-7B-shaped model (32 layers, hidden 4096, intermediate 11008, 32 heads,
vocabulary 32000; 6.74 B parameters) with random weights, written by `qlora init --nf4` straight into NF4 (each
projection drawn and quantized on its own: the dense model never exists), then `qlora train` for a few steps with
QLoRA r 16 on all seven projections, sequence 512 (packed), micro-batch 1, activation checkpointing, bfloat16 compute,
paged 8-bit AdamW, on this machine.

    .venv/bin/python bench/bench_7b.py [--steps 3] [--threads 2] [--dir build/bench/llama-2-7b] [--out bench/results/train_7b.json]

Validation before the numbers count: the run's loss is finite at every step and each step trains one packed row of
up to 512 tokens (the bundled KJV verse instructions, tokenized with the bundled 2,048-piece tokenizer, whose ids are
valid in the 32,000-entry vocabulary; whole examples are packed, so a row holds about 450 tokens). Reported: seconds
per step (the first step apart: it includes the first touch of every page), tokens/s, the peak RSS of the training process (VmHWM, from metrics.jsonl) against the goal of
6 GB, `qlora estimate` for the same config, and the fraction of the 6·P FLOP-per-token roofline reached (the bfloat16
GEMM rate measured at the model's shapes, as in bench_train.py). The model directory is reused when present (about
3.9 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import qlora  # noqa: E402,F401  (registers torch.ops.qlora for machine())
from bench_nf4_quant import machine  # noqa: E402
from bench_train import gemm_rate  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QLORA = os.path.join(REPO, "build", "bin", "qlora")
LLAMA2_7B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", vocab_size=32000,
                 hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
GOAL_BYTES = 6 * 10**9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dir", default=os.path.join(REPO, "build", "bench", "llama-2-7b"))
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "train_7b.json"))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    model = os.path.join(args.dir, "model-nf4")
    init_s = None
    if not os.path.exists(os.path.join(model, "config.json")):
        with open(os.path.join(args.dir, "config.json"), "w") as f:
            json.dump(LLAMA2_7B, f)
        t0 = time.perf_counter()
        subprocess.run([QLORA, "init", os.path.join(args.dir, "config.json"), model, "--nf4", "--dtype", "bf16",
                        "--seed", "0"], check=True)
        init_s = time.perf_counter() - t0
    run = os.path.join(args.dir, "run")
    subprocess.run(["rm", "-rf", run], check=True)
    config = os.path.join(args.dir, "qlora-7b.yaml")
    with open(config, "w") as f:
        f.write(f"""base_model: {model}
tokenizer: {os.path.join(REPO, 'models', 'tiny-kjv', 'tokenizer.model')}
adapter: qlora
load_in_4bit: true
lora_r: 16
lora_alpha: 32
lora_dropout: 0.0
lora_target_linear: true
datasets:
  - path: {os.path.join(REPO, 'data', 'tiny-kjv', 'verses.jsonl')}
    type: alpaca
val_set_size: 0
sequence_len: 512
sample_packing: true
micro_batch_size: 1
gradient_accumulation_steps: 1
max_steps: {args.steps}
optimizer: paged_adamw_8bit
lr_scheduler: constant
learning_rate: 2.0e-4
gradient_checkpointing: true
bf16: true
seed: 0
logging_steps: 1
save_steps: 100000
num_threads: {args.threads}
output_dir: {run}
""")
    rate = gemm_rate(LLAMA2_7B, torch.bfloat16, args.threads)  # before training: its own process, its own memory
    print(f"GEMM bf16, {args.threads} threads, 7B shapes: {rate['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    est = subprocess.run([QLORA, "estimate", config], check=True, capture_output=True, text=True).stdout
    print(est)
    estimate_mib = float(next(x for x in est.splitlines() if "total" in x).split()[0])
    t0 = time.perf_counter()
    subprocess.run([QLORA, "train", config], check=True)
    wall = time.perf_counter() - t0
    steps = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")) if '"loss"' in x]
    assert len(steps) == args.steps, steps
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps), steps
    peak = max(s["peak_rss_bytes"] for s in steps)
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])]
    step_s = sum(times) / len(times) if times else steps[0]["elapsed_s"]
    tokens = steps[-1]["tokens_seen"]  # cumulative: every token of the rows processed, padding excluded
    tokens_after_first = tokens - steps[0]["tokens_seen"]
    result = {
        "machine": machine(),
        "model": {"config": LLAMA2_7B, "parameters": 6_738_415_616, "nf4_dir_bytes": sum(
            os.path.getsize(os.path.join(model, f)) for f in os.listdir(model))},
        "run": {"steps": args.steps, "threads": args.threads, "sequence_len": 512, "micro_batch_size": 1,
                "lora_r": 16, "gradient_checkpointing": True, "compute_dtype": "bfloat16"},
        "init_seconds": init_s,
        "first_step_seconds": steps[0]["elapsed_s"],
        "seconds_per_step": step_s,
        "tokens_per_second": tokens_after_first / sum(times) if times else tokens / step_s,
        "train_wall_seconds": wall,
        "tokens_trained": tokens,
        "peak_rss_bytes": peak,
        "goal_peak_rss_bytes": GOAL_BYTES,
        "goal_met": peak <= GOAL_BYTES,
        "estimate_total_mib": estimate_mib,
        "estimate_vs_measured": estimate_mib * 2**20 / peak,
        "losses": [s["loss"] for s in steps],
        "gemm_gflops": rate["flops_per_s"] / 1e9,
        "matmul_parameters": rate["matmul_parameters"],
    }
    result["roofline_tokens_per_second"] = rate["flops_per_s"] / (6 * rate["matmul_parameters"])
    result["roofline_fraction"] = result["tokens_per_second"] / result["roofline_tokens_per_second"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "model")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
