"""NF4 quantize / dequantize on the CPU: qlora's ops vs bitsandbytes' CPU path vs a plain-PyTorch implementation.

    .venv/bin/python bench/bench_nf4_quant.py [--quick] [--out bench/results/nf4_quant.json]

Every implementation is validated against qlora before it is timed (identical dequantized values; quantized codes
equal where the formats agree, see tests/python/test_nf4.py). Timings are the median of repeated runs after a
warm-up, with 1 and 2 threads, all in this one process; results are reported as ratios to qlora's time measured in
the same run, plus GB/s of the dense side (bytes read by quantize, bytes written by dequantize). Dequantize is timed
both into a fresh tensor (allocation and first-touch page faults included, which is what a caller that does not
reuse buffers pays) and into a preallocated buffer (qlora's nf4_dequantize_into; bitsandbytes has no CPU kernel
for its out= variant).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import qlora
from qlora.reference import nf4_dequantize_ref, nf4_quantize_ref

import bitsandbytes.functional as bnbf  # noqa: E402  (benchmark-only dependency)


def machine() -> dict:
    cpu, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = [x for x in line.split(":", 1)[1].split() if x.startswith(("avx", "fma", "f16c", "amx"))]
    except OSError:
        pass
    return {
        "cpu": cpu,
        "simd_flags": flags,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "qlora_cpu_isa": torch.ops.qlora.cpu_isa(),
        "bitsandbytes": getattr(sys.modules.get("bitsandbytes"), "__version__", "?"),
    }


def median_time(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def validate(w: torch.Tensor, dq: bool) -> None:
    ours = qlora.quantize_nf4(w, 64, dq)
    ref = nf4_quantize_ref(w, 64, dq)
    got = torch.ops.qlora.nf4_quantize(w, 64, dq, None)
    assert all(torch.equal(a, b) for a, b in zip(got, ref)), "qlora and the PyTorch reference disagree"
    qs = bnbf.QuantState.from_dict(
        {k.split("w.", 1)[1]: v for k, v in ours.to_bnb_state_dict("w").items() if k != "w"}, device="cpu"
    )
    assert torch.equal(bnbf.dequantize_4bit(ours.packed, qs), ours.dequantize()), "bitsandbytes dequantize differs"
    args = (*got, list(w.shape), w.dtype, 64)
    assert torch.equal(nf4_dequantize_ref(*args), ours.dequantize()), "reference dequantize differs"


def bench_case(rows: int, cols: int, dtype: torch.dtype, dq: bool, threads: int, repeat: int) -> dict:
    torch.set_num_threads(threads)
    w = torch.randn(rows, cols).to(dtype)
    validate(w, dq)
    ours = qlora.quantize_nf4(w, 64, dq)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
    out = torch.empty_like(w)
    dense_gb = w.numel() * w.element_size() / 1e9
    t = {
        "quantize": {
            "qlora": median_time(lambda: qlora.quantize_nf4(w, 64, dq), repeat),
            "bitsandbytes": median_time(
                lambda: bnbf.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4"), repeat
            ),
            "pytorch_reference": median_time(lambda: nf4_quantize_ref(w, 64, dq), max(3, repeat // 3)),
        },
        "dequantize_fresh": {
            "qlora": median_time(lambda: ours.dequantize(), repeat),
            "bitsandbytes": median_time(lambda: bnbf.dequantize_4bit(packed, qs), repeat),
            "pytorch_reference": median_time(
                lambda: nf4_dequantize_ref(
                    ours.packed, ours.absmax, ours.nested_absmax, ours.nested_code, ours.offset, list(w.shape), dtype
                ),
                max(3, repeat // 3),
            ),
        },
        # bitsandbytes registers no CPU kernel for dequantize_4bit.out, so only qlora is timed here.
        "dequantize_into": {"qlora": median_time(lambda: ours.dequantize(out=out), repeat)},
    }
    result = {"shape": [rows, cols], "dtype": str(dtype).replace("torch.", ""), "double_quant": dq, "threads": threads}
    for op, times in t.items():
        base = times["qlora"]
        result[op] = {
            name: {
                "seconds": sec,
                "ratio_to_qlora": sec / base,
                "dense_GBps": dense_gb / sec,
            }
            for name, sec in times.items()
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small shape, few repeats (a smoke run)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "nf4_quant.json"))
    args = ap.parse_args()
    shapes = [(1024, 1024)] if args.quick else [(4096, 4096), (11008, 4096)]
    repeat = 3 if args.quick else 9
    cases = []
    for rows, cols in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            for dq in (True,) if dtype == torch.float32 else (False, True):
                for threads in (1, 2):
                    r = bench_case(rows, cols, dtype, dq, threads, repeat)
                    cases.append(r)
                    line = f"{rows}x{cols} {r['dtype']:8s} dq={int(dq)} threads={threads}:"
                    for op in ("quantize", "dequantize_fresh", "dequantize_into"):
                        q = r[op]["qlora"]
                        line += f"  {op} {q['seconds'] * 1e3:7.2f} ms ({q['dense_GBps']:5.1f} GB/s"
                        if "bitsandbytes" in r[op]:
                            line += f", bnb x{r[op]['bitsandbytes']['ratio_to_qlora']:.2f}"
                        if "pytorch_reference" in r[op]:
                            line += f", torch x{r[op]['pytorch_reference']['ratio_to_qlora']:.1f}"
                        line += ")"
                    print(line, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    doc = {
        "benchmark": "nf4_quant",
        "description": "NF4 quantize/dequantize, blocksize 64; ratio_to_qlora > 1 means slower than qlora",
        "machine": machine(),
        "cases": cases,
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
