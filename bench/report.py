"""Regenerates the benchmark tables in README.md from bench/results/*.json (between <!-- bench:NAME --> markers), and
the chart bench/results/train.png (matplotlib).

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
    if "parts" in doc:
        p = doc["parts"]
        ns = p["ns_per_element"]
        lines += [
            "",
            f"Where the 8-bit step's time goes: one thread, {p['elements'] // 1024} Ki elements (the data stays in the "
            "L2 cache), nanoseconds per element; decode and encode are each timed alone, for both moments; torch's "
            "fused kernel without its fixed cost per call "
            f"({p['torch_fused_seconds_per_call'] * 1e6:.1f} µs).",
            "",
            "| torch fused kernel | qlora 32-bit step | qlora 8-bit step | decode (alone) | encode (alone) |",
            "|---|---|---|---|---|",
            f"| {ns['torch_fused_kernel']:.3f} | {ns['adamw32_step']:.3f} | {ns['adamw8_step']:.3f} | "
            f"{ns['decode']:.3f} | {ns['encode']:.3f} |",
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
        f"(of the peak, {q['rss_before_load_bytes'] / gib:.2f} GiB is the process before loading: LibTorch's CPU "
        "libraries) |",
        f"| transformers + bitsandbytes `from_pretrained` | {t['seconds']:.1f} s (×{t['ratio_seconds_to_qlora']:.1f}) | "
        f"{t['peak_rss_bytes'] / gib:.2f} GiB (×{t['ratio_peak_rss_to_qlora']:.1f}) | | |",
    ])


def train_7b_table(doc: dict) -> str:
    m, r = doc["machine"], doc["run"]
    gib = 2**30
    init = f"{doc['init_seconds']:.0f} s" if doc.get("init_seconds") else "reused"
    roofline = (f"{100 * doc['roofline_fraction']:.0f}% (of {doc['roofline_tokens_per_second']:.1f} at "
                f"{doc['gemm_gflops']:.0f} GFLOP/s)" if "roofline_fraction" in doc else "not measured")
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU kernels {m['qlora_cpu_isa']}, torch {m['torch']}. Llama-2-7B shape "
        f"({doc['model']['parameters'] / 1e9:.2f} B parameters, random weights, NF4 file "
        f"{doc['model']['nf4_dir_bytes'] / gib:.2f} GiB), QLoRA r {r['lora_r']} on all seven projections, sequence "
        f"{r['sequence_len']} (packed), micro-batch {r['micro_batch_size']}, activation checkpointing, "
        f"{r['compute_dtype']} compute, paged 8-bit AdamW, {r['threads']} threads, {r['steps']} steps.",
        "",
        "| `qlora init --nf4` | first step | seconds per later step | tokens/s | of 6·P roofline | peak RSS (VmHWM) | "
        "goal ≤ 6 GB | `qlora estimate` | estimate / measured |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {init} | {doc['first_step_seconds']:.0f} s | {doc['seconds_per_step']:.0f} s | "
        f"{doc['tokens_per_second']:.2f} | {roofline} | "
        f"{doc['peak_rss_bytes'] / 1e9:.2f} GB ({doc['peak_rss_bytes'] / gib:.2f} GiB) | "
        f"{'met' if doc['goal_met'] else 'MISSED'} | {doc['estimate_total_mib'] / 1024:.2f} GiB | "
        f"{doc['estimate_vs_measured']:.2f} |",
    ])


TRAIN_SYSTEMS = {"qlora_train": "`qlora train`", "transformers_peft_bnb": "transformers + PEFT + bitsandbytes",
                 "transformers_qlora_nn": "transformers + `qlora.nn`"}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def ideal_tokens_per_second(doc: dict, case: dict) -> float:
    """An upper bound for any QLoRA implementation of the case: its necessary matmul and attention FLOPs per token
    at the GEMM rate measured in the same run (see the table text)."""
    md = doc["model"]
    h, i, v, n, t = md["hidden_size"], md["intermediate_size"], md["vocab_size"], md["num_hidden_layers"], 512
    kv = h // md["num_attention_heads"] * md["num_key_value_heads"]
    p_layers = n * (2 * h * h + 2 * h * kv + 3 * h * i)
    p_all = p_layers + h * v
    ckpt = case["gradient_checkpointing"]
    matmul = 4 * p_all + (2 * p_layers if ckpt else 0)
    attn_fwd = n * 2 * t * h  # causal: QK^T and PV over t/2 keys on average, 2 FLOP per multiply-add
    attention = attn_fwd * (3 + (1 if ckpt else 0))  # backward = 2 forwards
    rate = doc["gemm"][f"{case['dtype']}-{case['threads']}"]["gflops"] * 1e9
    return rate / (matmul + attention)


def train_table(doc: dict) -> str:
    m, md = doc["machine"], doc["model"]
    gemm = ", ".join(f"{DTYPE_NAMES[k.split('-')[0]]} {k.split('-')[1]} thread{'s' if k.split('-')[1] != '1' else ''} "
                     f"{v['gflops']:.0f}" for k, v in doc["gemm"].items())
    p = next(iter(doc["gemm"].values()))["matmul_parameters"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU kernels {m['qlora_cpu_isa']}, torch {m['torch']}, bitsandbytes "
        f"{m['bitsandbytes']}. Model: {md['parameters'] / 1e6:.0f} M parameters (hidden {md['hidden_size']}, "
        f"{md['num_hidden_layers']} layers, GQA {md['num_attention_heads']}/{md['num_key_value_heads']}, vocabulary "
        f"{md['vocab_size']}), QLoRA r 16 on all projections, sequence 512, micro-batch 1, paged 8-bit AdamW, "
        f"{doc['steps']} steps; ×N = ratio to transformers + PEFT + bitsandbytes in the same case. Roofline: "
        f"R / 6P tokens/s with P = {p / 1e6:.1f} M matmul parameters and R the GEMM rate measured at the model's "
        f"shapes (GFLOP/s: {gemm}).",
        "",
        "| compute | threads | checkpointing | system | tokens/s | of roofline | peak RSS | loss, last 3 steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in doc["cases"]:
        for key, s in c["systems"].items():
            lines.append(
                f"| {c['dtype']} | {c['threads']} | {'on' if c['gradient_checkpointing'] else 'off'} | "
                f"{TRAIN_SYSTEMS[key]} | {s['tokens_per_second']:.0f} (×{s['tokens_per_second_vs_bnb']:.2f}) | "
                f"{100 * s['roofline_fraction']:.0f}% | "
                f"{s['peak_rss_bytes'] / 2**30:.2f} GiB (×{s['peak_rss_vs_bnb']:.2f}) | {s['final_loss']:.3f} |"
            )
    lines += [
        "",
        "What ×2 would take: the ideal step does only the matmuls QLoRA needs (forward 2P, input gradient 2P, the "
        "layers' 2P again when checkpointing recomputes them; no weight gradient of the frozen base; LoRA left out) "
        "and causal attention's FLOPs, all at the measured GEMM rate, and nothing else (no loss, norms, activations "
        "or optimizer):",
        "",
        "| compute | threads | checkpointing | ideal tokens/s | `qlora train` | bitsandbytes | ×2 bitsandbytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in doc["cases"]:
        ideal = ideal_tokens_per_second(doc, c)
        q, b = c["systems"]["qlora_train"]["tokens_per_second"], c["systems"]["transformers_peft_bnb"]["tokens_per_second"]
        lines.append(
            f"| {c['dtype']} | {c['threads']} | {'on' if c['gradient_checkpointing'] else 'off'} | {ideal:.0f} | "
            f"{100 * q / ideal:.0f}% of ideal | {100 * b / ideal:.0f}% | {100 * 2 * b / ideal:.0f}% |"
        )
    lines += ["", "![tokens/s and peak RSS per system](bench/results/train.png)", ""]
    order = ["matmul", "attention", "loss", "qlora", "optimizer", "other", "outside_ops"]
    heads = {"qlora": "qlora NF4 ops", "optimizer": "optimizer ops", "outside_ops": "outside any op",
             "loss": "loss (vocabulary log-softmax)"}
    lines += [
        "Where `qlora train`'s step goes (`qlora train --profile`, 1 thread, checkpointing on, steps 2–3; self time "
        "of the operators by category, as a share of the steps' wall time):",
        "",
        "| compute | phase: forward | backward (with recompute) | optimizer step | "
        + " | ".join(heads.get(k, k) for k in order) + " | top operators |",
        "|---|---|---|---|" + "---|" * len(order) + "---|",
    ]
    for dtype, pr in doc["profiles"].items():
        top = ", ".join(f"{o['name']} {100 * o['self_share']:.0f}%" for o in pr["top_ops"][:4])
        lines.append(
            f"| {dtype} | {100 * pr['phases']['forward']:.0f}% | {100 * pr['phases']['backward']:.0f}% | "
            f"{100 * pr['phases']['optimizer']:.1f}% | "
            + " | ".join(f"{100 * pr['categories'].get(k, 0.0):.1f}%" for k in order) + f" | {top} |"
        )
    return "\n".join(lines)


def train_chart(doc: dict, path: str) -> None:
    """bench/results/train.png: tokens/s (with each case's roofline) and peak RSS, a bar per system and case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = doc["cases"]
    labels = [f"{c['dtype']}\n{c['threads']}t, ckpt {'on' if c['gradient_checkpointing'] else 'off'}" for c in cases]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    width = 0.8 / len(TRAIN_SYSTEMS)
    for ax, key, title, scale in ((axes[0], "tokens_per_second", "tokens/s (higher is better)", 1.0),
                                  (axes[1], "peak_rss_bytes", "peak RSS, GiB (lower is better)", 2.0 ** -30)):
        for k, (sys_key, name) in enumerate(TRAIN_SYSTEMS.items()):
            xs = [i + (k - (len(TRAIN_SYSTEMS) - 1) / 2) * width for i in range(len(cases))]
            ax.bar(xs, [c["systems"][sys_key][key] * scale for c in cases], width, label=name.replace("`", ""))
        if key == "tokens_per_second":
            for i, c in enumerate(cases):
                ax.hlines(c["roofline_tokens_per_second"], i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                          label="6·P roofline" if i == 0 else None)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    m = doc["machine"]
    fig.suptitle(f"QLoRA training, {doc['model']['parameters'] / 1e6:.0f} M-parameter Llama, sequence 512, "
                 f"r 16 ({m['cpu']}, {m['cores']} cores, torch {m['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


TABLES = {"nf4_quant": nf4_quant_table, "nf4_linear": nf4_linear_table, "adamw": adamw_table, "load": load_table,
          "train_7b": train_7b_table, "train": train_table}
CHARTS = {"train": train_chart}


def main() -> None:
    with open(README) as fh:
        text = fh.read()
    for name, render in TABLES.items():
        path = os.path.join(HERE, "results", f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            doc = json.load(fh)
        table = render(doc)
        if name in CHARTS:
            CHARTS[name](doc, os.path.join(HERE, "results", f"{name}.png"))
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    with open(README, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
