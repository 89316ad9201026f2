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


TABLES = {"nf4_quant": nf4_quant_table}


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
