"""Loading a Hugging Face Llama checkpoint into NF4 + LoRA: load time and peak RSS of qlora's streaming loader
(trainer/, `load_model`) vs transformers + bitsandbytes (`from_pretrained` with a BitsAndBytesConfig) on the same
files, each in a fresh process.

    .venv/bin/python bench/bench_load.py [--quick] [--out bench/results/load.json] [--dir DIR]

The benchmark writes a synthetic Llama-3.2-1B-shaped checkpoint (hidden 2048, intermediate 8192, 16 layers, 32 heads,
8 key/value heads, vocabulary 128256, tied embeddings; 1.24 B parameters) as bfloat16 safetensors in 1 GB shards,
with random weights (std 0.02). Both loaders quantize the seven projections of every layer to NF4 (blocksize 64,
double quantization) and keep the embedding in bfloat16 (compute dtype); qlora also adds LoRA (r 8) to them. The files
are in the page cache for both (the benchmark has just written them), so the times are CPU-bound.

Validation before the numbers count: the two loaded models give the same logits on a probe sequence, both in
bfloat16 (differences only from operation order in bfloat16 arithmetic: bounded at 3 % of the logit range, far below
what a wrong or missing weight gives). Goal (issue 5): qlora's peak RSS <= NF4 model size (its NF4 projections plus
its dense parts) + the largest single tensor + 300 MB. --quick uses a 4-layer, 1024-hidden model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_quant import machine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "build", "bin", "qlora_safetensors")
PROBE = [1, 15043, 29892, 920, 526, 366, 2599, 29973, 306, 626]

FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, head_dim=64, vocab_size=128256)
QUICK = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, vocab_size=32000)


def tensor_shapes(c: dict) -> list[tuple[str, list[int]]]:
    e, i, q, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * c["head_dim"], \
        c["num_key_value_heads"] * c["head_dim"]
    out = [("model.embed_tokens.weight", [c["vocab_size"], e])]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", [e]), (p + "post_attention_layernorm.weight", [e]),
                (p + "self_attn.q_proj.weight", [q, e]), (p + "self_attn.k_proj.weight", [kv, e]),
                (p + "self_attn.v_proj.weight", [kv, e]), (p + "self_attn.o_proj.weight", [e, q]),
                (p + "mlp.gate_proj.weight", [i, e]), (p + "mlp.up_proj.weight", [i, e]),
                (p + "mlp.down_proj.weight", [e, i])]
    out.append(("model.norm.weight", [e]))
    return out


def write_checkpoint(directory: str, c: dict, shard_bytes: int = 1 << 30) -> dict:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
                  rope_theta=500000.0, max_position_embeddings=2048, tie_word_embeddings=True, torch_dtype="bfloat16",
                  bos_token_id=1, eos_token_id=2, **c)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    gen = torch.Generator().manual_seed(0)
    shapes = tensor_shapes(c)
    shards, current, size = [], {}, 0
    for name, shape in shapes:
        t = (torch.randn(shape, generator=gen) * 0.02 if len(shape) == 2 else 1 + 0.1 * torch.randn(shape, generator=gen))
        t = t.to(torch.bfloat16)
        if current and size + t.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = file
            total += t.nbytes
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    largest = max(torch.Size(s).numel() for _, s in shapes) * 2  # bfloat16
    params = sum(torch.Size(s).numel() for _, s in shapes)
    return {"parameters": params, "checkpoint_bytes": total, "largest_tensor_bytes": largest, "shards": len(shards)}


BASELINE = r"""
import json, sys, time, torch
import bitsandbytes as bnb
from transformers import BitsAndBytesConfig, LlamaForCausalLM
directory, probe, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
model = LlamaForCausalLM.from_pretrained(directory, quantization_config=config, dtype=torch.bfloat16,
                                         device_map="cpu").eval()
seconds = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so it would start at the parent's RSS.
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
for m in model.modules():  # the portable path (the AVX512-BF16 fast path would repack the weights first)
    if isinstance(m, bnb.nn.Linear4bit):
        m.support_avx512bf16_for_cpu = False
with torch.no_grad():
    logits = model(torch.tensor([probe])).logits.float()
from safetensors.torch import save_file
save_file({"logits": logits}, out)
print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak}))
"""


def run_qlora(directory: str) -> dict:
    r = subprocess.run([TOOL, "load-bench", directory, "--dtype=bfloat16", "--nf4=all"], capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "load.json"))
    ap.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory, removed after)")
    args = ap.parse_args()
    if not os.path.exists(TOOL):
        sys.exit(f"{TOOL} is missing: build the C++ targets first (scripts/test.sh or cmake --build build)")
    c = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = os.path.join(tmp, "llama")
        t0 = time.perf_counter()
        info = write_checkpoint(directory, c)
        print(f"wrote {info['parameters'] / 1e9:.2f} B parameters ({info['checkpoint_bytes'] / 2**30:.2f} GiB, "
              f"{info['shards']} shards) in {time.perf_counter() - t0:.0f} s", flush=True)

        # Validation: both loaders' models agree on a probe sequence.
        ours_file, theirs_file = os.path.join(tmp, "ours.safetensors"), os.path.join(tmp, "theirs.safetensors")
        subprocess.run([TOOL, "logits", directory, ours_file, *map(str, PROBE), "--dtype=bfloat16", "--nf4=all"],
                       check=True)
        baseline = json.loads(subprocess.run([sys.executable, "-c", BASELINE, directory, json.dumps(PROBE),
                                              theirs_file], capture_output=True, text=True, check=True).stdout
                              .strip().splitlines()[-1])
        from safetensors.torch import load_file

        ours, theirs = load_file(ours_file)["logits"], load_file(theirs_file)["logits"]
        spread = (theirs.max() - theirs.min()).item()
        err = (ours - theirs).abs().max().item()
        assert err <= 0.03 * spread, f"qlora's model differs from transformers + bitsandbytes: {err} vs range {spread}"
        print(f"validated: max |logit difference| {err:.4f} (logit range {spread:.2f})", flush=True)

        qlora_run = run_qlora(directory)
        model_bytes = qlora_run["nf4_bytes"] + qlora_run["dense_bytes"]
        budget = model_bytes + info["largest_tensor_bytes"] + 300 * 2**20
        doc = {
            "machine": machine(),
            "config": c,
            "checkpoint": info,
            "validation": {"max_abs_logit_difference": err, "logit_range": spread},
            "qlora": {**qlora_run, "model_bytes": model_bytes, "budget_bytes": budget,
                      "peak_over_budget": qlora_run["peak_rss_bytes"] / budget},
            "transformers_bitsandbytes": {**baseline,
                                          "ratio_seconds_to_qlora": baseline["seconds"] / qlora_run["seconds"],
                                          "ratio_peak_rss_to_qlora": baseline["peak_rss_bytes"] /
                                          qlora_run["peak_rss_bytes"]},
            "goal_met": qlora_run["peak_rss_bytes"] <= budget,
        }
    gib = 2**30
    print(f"qlora: {qlora_run['seconds']:.1f} s, peak RSS {qlora_run['peak_rss_bytes'] / gib:.2f} GiB "
          f"(NF4 {qlora_run['nf4_bytes'] / gib:.2f} + dense {qlora_run['dense_bytes'] / gib:.2f} GiB; budget "
          f"{budget / gib:.2f} GiB; process before loading {qlora_run['rss_before_load_bytes'] / gib:.2f} GiB)")
    print(f"transformers + bitsandbytes: {baseline['seconds']:.1f} s (x{doc['transformers_bitsandbytes']['ratio_seconds_to_qlora']:.1f}), "
          f"peak RSS {baseline['peak_rss_bytes'] / gib:.2f} GiB "
          f"(x{doc['transformers_bitsandbytes']['ratio_peak_rss_to_qlora']:.1f})")
    print("goal (peak <= model + largest tensor + 300 MB):", "met" if doc["goal_met"] else "MISSED")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
