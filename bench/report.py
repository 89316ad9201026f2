"""Regenerates the benchmark tables in README.md from bench/results/*.json (between <!-- bench:NAME --> markers).

    .venv/bin/python bench/report.py
"""

import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")


def nf4_quant_table(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU kernels {m['qlora_cpu_isa']}, torch {m['torch']}, "
        f"bitsandbytes {m['bitsandbytes']}. Times are medians; ×N = that implementation's time / qlora's time in the "
        "same run (higher is slower than qlora).",
        "",
        "| shape | dtype | double quant | threads | quantize (GB/s read) | vs bitsandbytes | vs PyTorch | "
        "dequantize into buffer (GB/s written) | dequantize, fresh tensor | vs bitsandbytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in doc["cases"]:
        q, f, i = c["quantize"], c["dequantize_fresh"], c["dequantize_into"]
        lines.append(
            f"| {c['shape'][0]}×{c['shape'][1]} | {c['dtype']} | {'yes' if c['double_quant'] else 'no'} | "
            f"{c['threads']} | {q['qlora']['seconds'] * 1e3:.2f} ms ({q['qlora']['dense_GBps']:.1f}) | "
            f"×{q['bitsandbytes']['ratio_to_qlora']:.0f} | ×{q['pytorch_reference']['ratio_to_qlora']:.0f} | "
            f"{i['qlora']['seconds'] * 1e3:.2f} ms ({i['qlora']['dense_GBps']:.1f}) | "
            f"{f['qlora']['seconds'] * 1e3:.2f} ms | ×{f['bitsandbytes']['ratio_to_qlora']:.2f} |"
        )
    return "\n".join(lines)


def nf4_linear_table(doc: dict) -> str:
    m = doc["machine"]
    bw = ", ".join(f"{t} thread{'s' if t != '1' else ''} {v:.1f} GB/s" for t, v in doc["read_GBps"].items())
    lines = [
        f"Machine: {m['cpu']}, CPU kernels {m['qlora_cpu_isa']}, measured read bandwidth {bw}. ×N = the baseline's "
        "time / qlora's time in the same run (higher is slower than qlora).",
        "",
        "Decode (M = 1, float32 activations, NF4 double-quantized weight):",
        "",
        "| weight | threads | qlora | G weights/s | % of read roofline | bitsandbytes (bf16) | dense fp32 | dense bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in doc["decode"]:
        s = c["seconds"]
        q = s["qlora_fp32"]
        n, k = c["shape"]
        lines.append(
            f"| {n}×{k} | {c['threads']} | {q * 1e3:.2f} ms | {n * k / q / 1e9:.1f} | "
            f"{100 * c['roofline_seconds'] / q:.0f}% | ×{s['bitsandbytes_bf16'] / q:.1f} | "
            f"×{s['dense_fp32'] / q:.2f} | ×{s['dense_bf16'] / q:.2f} |"
        )
    lines += [
        "",
        "Training shapes (4096×4096, float32, gradient to x; ratio = qlora / dense float32 F.linear, lower is better; "
        "peak RSS growth measured in a fresh process from after set-up):",
        "",
        "| M | threads | forward | ratio | forward + backward | ratio | peak RSS growth qlora / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in doc["train"]:
        q, d = c["qlora"], c["dense"]
        lines.append(
            f"| {c['M']} | {c['threads']} | {q['fwd'] * 1e3:.1f} ms | {q['fwd'] / d['fwd']:.2f} | "
            f"{q['fwd_bwd'] * 1e3:.1f} ms | {q['fwd_bwd'] / d['fwd_bwd']:.2f} | "
            f"{q['peak_rss_growth_bytes'] / 2**20:.0f} / {d['peak_rss_growth_bytes'] / 2**20:.0f} MiB |"
        )
    return "\n".join(lines)


def adamw_table(doc: dict) -> str:
    m = doc["machine"]
    names = [
        ("qlora_8bit", "qlora 8-bit"),
        ("qlora_32bit", "qlora 32-bit"),
        ("torch_fused", "torch fused"),
        ("torch_foreach", "torch foreach"),
        ("bitsandbytes_8bit", "bitsandbytes 8-bit"),
    ]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU kernels {m['qlora_cpu_isa']}, torch {m['torch']}, "
        f"bitsandbytes {m['bitsandbytes']}. One float32 parameter; median step time, ×N = time / the fastest torch "
        "AdamW's time in the same run (lower is faster).",
        "",
        "| parameters | threads | " + " | ".join(label for _, label in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for c in doc["cases"]:
        cells = [f"{c['seconds'][k] * 1e3:.1f} ms (×{c['ratio_to_fastest_torch'][k]:.2f})" for k, _ in names]
        lines.append(f"| {c['numel'] / 1e6:.0f} M | {c['threads']} | " + " | ".join(cells) + " |")
    sb = doc["cases"][0]["state_bytes_per_param"]
    lines += [
        "",
        "State bytes per parameter: " + ", ".join(f"{label} {sb[k]:.3f}" for k, label in names) + ".",
    ]
    return "\n".join(lines)


def load_table(doc: dict) -> str:
    m, c, q, t = doc["machine"], doc["checkpoint"], doc["qlora"], doc["transformers_bitsandbytes"]
    gib = 2**30
    return "\n".join([
        f"Machine: {m['cpu']}, torch {m['torch']}, bitsandbytes {m['bitsandbytes']}. Checkpoint: "
        f"{c['parameters'] / 1e9:.2f} B parameters, bfloat16, {c['shards']} shards ({c['checkpoint_bytes'] / gib:.2f} GiB, "
        f"largest tensor {c['largest_tensor_bytes'] / gib:.2f} GiB), in the page cache. Both quantize the seven "
        "projections to NF4 (double quantization) with bfloat16 compute; each runs in a fresh process; peak RSS is the "
        "process's VmHWM. Validation: the two models' logits agree to "
        f"{doc['validation']['max_abs_logit_difference']:.3f} (logit range {doc['validation']['logit_range']:.1f}).",
        "",
        "| loader | load time | peak RSS | model in memory | goal: peak ≤ model + largest tensor + 300 MB |",
        "|---|---|---|---|---|",
        f"| qlora `load_model` (streaming) | {q['seconds']:.1f} s | {q['peak_rss_bytes'] / gib:.2f} GiB | "
        f"{q['model_bytes'] / gib:.2f} GiB (NF4 {q['nf4_bytes'] / gib:.2f} + dense {q['dense_bytes'] / gib:.2f}) | "
        f"{q['budget_bytes'] / gib:.2f} GiB: {'met' if doc['goal_met'] else 'MISSED'} "
        f"(of the peak, {q['rss_before_load_bytes'] / gib:.2f} GiB is the process before loading: LibTorch's CUDA "
        "build) |",
        f"| transformers + bitsandbytes `from_pretrained` | {t['seconds']:.1f} s (×{t['ratio_seconds_to_qlora']:.1f}) | "
        f"{t['peak_rss_bytes'] / gib:.2f} GiB (×{t['ratio_peak_rss_to_qlora']:.1f}) | | |",
    ])


def train_7b_table(doc: dict) -> str:
    m, r = doc["machine"], doc["run"]
    gib = 2**30
    init = f"{doc['init_seconds']:.0f} s" if doc.get("init_seconds") else "reused"
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU kernels {m['qlora_cpu_isa']}, torch {m['torch']}. Llama-2-7B shape "
        f"({doc['model']['parameters'] / 1e9:.2f} B parameters, random weights, NF4 file "
        f"{doc['model']['nf4_dir_bytes'] / gib:.2f} GiB), QLoRA r {r['lora_r']} on all seven projections, sequence "
        f"{r['sequence_len']} (packed), micro-batch {r['micro_batch_size']}, activation checkpointing, "
        f"{r['compute_dtype']} compute, paged 8-bit AdamW, {r['threads']} threads, {r['steps']} steps.",
        "",
        "| `qlora init --nf4` | first step | seconds per later step | tokens/s | peak RSS (VmHWM) | goal ≤ 6 GB | "
        "`qlora estimate` | estimate / measured |",
        "|---|---|---|---|---|---|---|---|",
        f"| {init} | {doc['first_step_seconds']:.0f} s | {doc['seconds_per_step']:.0f} s | "
        f"{doc['tokens_per_second']:.2f} | {doc['peak_rss_bytes'] / 1e9:.2f} GB ({doc['peak_rss_bytes'] / gib:.2f} GiB) | "
        f"{'met' if doc['goal_met'] else 'MISSED'} | {doc['estimate_total_mib'] / 1024:.2f} GiB | "
        f"{doc['estimate_vs_measured']:.2f} |",
    ])


def train_table(doc: dict) -> str:
    m, md = doc["machine"], doc["model"]
    names = {"qlora_train": "`qlora train`", "transformers_peft_bnb": "transformers + PEFT + bitsandbytes",
             "transformers_qlora_nn": "transformers + `qlora.nn`"}
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU kernels {m['qlora_cpu_isa']}, torch {m['torch']}, bitsandbytes "
        f"{m['bitsandbytes']}. Model: {md['parameters'] / 1e6:.0f} M parameters (hidden {md['hidden_size']}, "
        f"{md['num_hidden_layers']} layers, GQA {md['num_attention_heads']}/{md['num_key_value_heads']}, vocabulary "
        f"{md['vocab_size']}), QLoRA r 16 on all projections, float32, sequence 512, micro-batch 1, paged 8-bit AdamW, "
        f"{doc['steps']} steps; ×N = ratio to transformers + PEFT + bitsandbytes in the same case.",
        "",
        "| threads | checkpointing | system | tokens/s | peak RSS | loss, last 3 steps |",
        "|---|---|---|---|---|---|",
    ]
    for c in doc["cases"]:
        for key, s in c["systems"].items():
            lines.append(
                f"| {c['threads']} | {'on' if c['gradient_checkpointing'] else 'off'} | {names[key]} | "
                f"{s['tokens_per_second']:.0f} (×{s['tokens_per_second_vs_bnb']:.2f}) | "
                f"{s['peak_rss_bytes'] / 2**30:.2f} GiB (×{s['peak_rss_vs_bnb']:.2f}) | {s['final_loss']:.3f} |"
            )
    return "\n".join(lines)


TABLES = {"nf4_quant": nf4_quant_table, "nf4_linear": nf4_linear_table, "adamw": adamw_table, "load": load_table,
          "train_7b": train_7b_table, "train": train_table}


def main() -> None:
    with open(README) as fh:
        text = fh.read()
    for name, render in TABLES.items():
        path = os.path.join(HERE, "results", f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            table = render(json.load(fh))
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    with open(README, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
