"""NF4 linear on the CPU: qlora's fused small-M kernel and tiled large-M path vs dense F.linear and bitsandbytes.

    .venv/bin/python bench/bench_nf4_linear.py [--quick] [--out bench/results/nf4_linear.json]

Part 1, decode (M = 1): 4096x4096, 11008x4096 and 4096x11008 weights; G weights/s, and the share of a read-bandwidth
roofline this script measures itself (time to stream the NF4 bytes at the machine's measured read bandwidth).
Baselines in the same process: bitsandbytes' CPU matmul_4bit on the same bytes, dense float32 and bfloat16 F.linear.
Part 2, M = 16 and M = 2048 on 4096x4096: forward and forward+backward (gradient to x) vs dense float32 F.linear, and
the peak extra memory of each: resident memory sampled every 0.2 ms in a child process, above its level after set-up.
Every result is checked against a float64 reference before it is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import qlora

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_nf4_quant import machine  # noqa: E402


def median_time(fn, repeat, warmup=2):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def read_bandwidth_gbps(threads: int) -> float:
    torch.set_num_threads(threads)
    buf = torch.ones(64 * 2**20 // 4)  # 64 MiB, larger than the caches
    t = median_time(lambda: buf.sum(), 9)
    return buf.numel() * 4 / t / 1e9


def check(y, ref64, what):
    err = (y.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    assert err <= 1e-2 * scale, f"{what}: max error {err:.3g} vs output scale {scale:.3g}"


def decode_case(n, k, threads, repeat):
    import bitsandbytes.functional as bnbf
    import bitsandbytes as bnb

    torch.set_num_threads(threads)
    w = torch.randn(n, k)
    q = qlora.quantize_nf4(w, 64, True)
    wd = q.dequantize(torch.float32)
    x = torch.randn(1, k)
    ref = x.double() @ wd.double().T
    xb = x.bfloat16()
    wb = wd.bfloat16()
    # bitsandbytes on the same bytes (its QuantState built from qlora's state dict)
    sd = {k2.split("w.", 1)[1]: v for k2, v in q.to_bnb_state_dict("w").items() if k2 != "w"}
    qs = bnbf.QuantState.from_dict(sd, device="cpu")
    runs = {
        "qlora_fp32": lambda: qlora.functional.linear(x, q),
        "qlora_bf16": lambda: qlora.functional.linear(xb, q),
        "bitsandbytes_bf16": lambda: bnb.matmul_4bit(xb, q.packed.t(), quant_state=qs),
        "dense_fp32": lambda: F.linear(x, wd),
        "dense_bf16": lambda: F.linear(xb, wb),
    }
    with torch.no_grad():
        for name, fn in runs.items():
            check(fn(), ref, name)
        times = {name: median_time(fn, repeat) for name, fn in runs.items()}
    nf4_bytes = q.packed.numel() + q.absmax.numel() + q.nested_absmax.numel() * 4
    return {"shape": [n, k], "threads": threads, "seconds": times, "nf4_bytes": nf4_bytes}


CHILD = r"""
import resource, sys, time, json, torch, torch.nn.functional as F, qlora
mode, m, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
n = k = 4096
x = torch.randn(m, k)
if mode == "qlora":
    # Quantized 256 rows at a time (blocks of 64 never straddle rows here), so the dense weight never exists.
    parts = [qlora.quantize_nf4(torch.randn(256, k), 64, False) for _ in range(n // 256)]
    q = qlora.NF4Tensor(torch.cat([p.packed for p in parts]), torch.cat([p.absmax for p in parts]), None, None, None,
                        torch.Size([n, k]), torch.float32, 64)
    ref = x[:8].double() @ parts[0].dequantize().double().T  # a slice: no large temporaries before `base`
    del parts
    fwd = lambda x: qlora.functional.linear(x, q)
else:
    wd = torch.randn(n, k)
    ref = x[:8].double() @ wd[:256].double().T
    fwd = lambda x: F.linear(x, wd)
# Peak memory: the high-water mark of the process (ru_maxrss) is set by import-time peaks, so sample the current RSS
# (/proc/self/statm) from a thread every 0.2 ms instead, from right after set-up.
import os, threading
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak = [0]
stop = threading.Event()
def sampler():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0002)
base = rss()
threading.Thread(target=sampler, daemon=True).start()
y = fwd(x)
err = (y[:8, :256].double() - ref).abs().max().item()
assert err <= 1e-3 * ref.abs().max().item(), f"{mode}: wrong result (max error {err})"
del y
def step(backward):
    xx = x.clone().requires_grad_(backward)
    y = fwd(xx)
    if backward:
        y.backward(torch.ones_like(y))
out = {}
for backward in (False, True):
    step(backward)
    ts = []
    for _ in range(5 if m > 100 else 20):
        t0 = time.perf_counter(); step(backward); ts.append(time.perf_counter() - t0)
    ts.sort()
    out["fwd_bwd" if backward else "fwd"] = ts[len(ts) // 2]
stop.set()
time.sleep(0.01)
out["peak_rss_growth_bytes"] = max(0, peak[0] - base)
out["activation_bytes"] = x.numel() * 4 * 3  # x, y and grad_x of this step, for scale
print(json.dumps(out))
"""


def train_case(m, threads):
    res = {}
    for mode in ("qlora", "dense"):
        p = subprocess.run([sys.executable, "-c", CHILD, mode, str(m), str(threads)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    return {"M": m, "shape": [4096, 4096], "threads": threads, **res}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "nf4_linear.json"))
    args = ap.parse_args()
    shapes = [(1024, 1024)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    doc = {"benchmark": "nf4_linear", "machine": machine(), "decode": [], "train": [], "read_GBps": {}}
    for threads in (1, 2):
        bw = read_bandwidth_gbps(threads)
        doc["read_GBps"][str(threads)] = bw
        for n, k in shapes:
            r = decode_case(n, k, threads, 5 if args.quick else 21)
            r["roofline_seconds"] = r["nf4_bytes"] / (bw * 1e9)
            doc["decode"].append(r)
            s = r["seconds"]
            q = s["qlora_fp32"]
            print(
                f"M=1 {n}x{k} threads={threads}: qlora fp32 {q * 1e3:.3f} ms ({n * k / q / 1e9:.2f} Gweights/s, "
                f"{100 * r['roofline_seconds'] / q:.0f}% of read roofline at {bw:.1f} GB/s), bf16 {s['qlora_bf16'] * 1e3:.3f} ms; "
                f"bnb bf16 x{s['bitsandbytes_bf16'] / q:.2f}, dense fp32 x{s['dense_fp32'] / q:.2f}, "
                f"dense bf16 x{s['dense_bf16'] / q:.2f}",
                flush=True,
            )
    for m in ([16] if args.quick else [16, 2048]):
        for threads in (1, 2):
            r = train_case(m, threads)
            doc["train"].append(r)
            ql, de = r["qlora"], r["dense"]
            print(
                f"M={m} 4096x4096 threads={threads}: fwd {ql['fwd'] * 1e3:.2f} ms (x{ql['fwd'] / de['fwd']:.2f} of dense fp32), "
                f"fwd+bwd {ql['fwd_bwd'] * 1e3:.2f} ms (x{ql['fwd_bwd'] / de['fwd_bwd']:.2f}); peak RSS growth "
                f"qlora {ql['peak_rss_growth_bytes'] / 2**20:.1f} MiB vs dense {de['peak_rss_growth_bytes'] / 2**20:.1f} MiB "
                f"(activations {ql['activation_bytes'] / 2**20:.1f} MiB; one dense fp32 weight = 64 MiB)",
                flush=True,
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
