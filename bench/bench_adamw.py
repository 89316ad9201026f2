"""AdamW step time and state memory on the CPU: qlora's 8-bit and 32-bit AdamW vs torch.optim.AdamW (foreach and
fused, float32 states) vs bitsandbytes' AdamW8bit (its CPU backend).

    .venv/bin/python bench/bench_adamw.py [--quick] [--out bench/results/adamw.json]

One float32 parameter of 10 M and 100 M elements, gradient randn * 0.01, lr 1e-3, weight decay 1e-2, 1 and 2 threads,
all in this one process. Before timing, every implementation is validated: qlora's 8-bit step equals the plain-PyTorch
reference (qlora.reference) bit for bit on a 1 Mi-element slice, and one step of each optimizer stays within
bitsandbytes' test tolerance of torch's AdamW (spec §4.8). Times are medians of repeated steps after warm-up steps
(states are non-zero by then). Ratios are against the fastest torch AdamW of the same size and thread count, measured in
the same run; state memory is bytes of optimizer state per parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import qlora
from qlora.optim import AdamW8bit, AdamW32bit
from qlora.reference import adamw8bit_step_ref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_quant import machine  # noqa: E402

import bitsandbytes as bnb  # noqa: E402  (benchmark-only dependency)

LR, WD = 1e-3, 1e-2


def state_bytes(opt, p) -> int:
    return sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if torch.is_tensor(v) and k != "step"
               and not k.startswith("qmap"))


def validate() -> None:
    n = 1 << 20
    p = torch.randn(n)
    q1, q2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(n // 256), torch.zeros(n // 256)
    m1, m2 = torch.ops.qlora.dynamic8_code(True), torch.ops.qlora.dynamic8_code(False)
    for t in (1, 2, 3):
        g = torch.randn(n) * 0.01
        want = adamw8bit_step_ref(p, g, q1, q2, a1, a2, m1, m2, t, LR, 0.9, 0.999, 1e-8, WD)
        torch.ops.qlora.adamw8bit_step(p, g, q1, q2, a1, a2, m1, m2, t, LR, 0.9, 0.999, 1e-8, WD)
        assert all(torch.equal(x, y) for x, y in zip((p, q1, q2, a1, a2), want)), "qlora differs from the reference"
    w = torch.randn(1024, 1024) * 0.1
    ref = torch.nn.Parameter(w.clone())
    torch_opt = torch.optim.AdamW([ref], lr=LR, weight_decay=WD)
    g = torch.randn_like(w) * 0.01
    ref.grad = g.clone()
    torch_opt.step()
    for make in (lambda ps: AdamW8bit(ps, lr=LR, weight_decay=WD), lambda ps: AdamW32bit(ps, lr=LR, weight_decay=WD),
                 lambda ps: bnb.optim.AdamW8bit(ps, lr=LR, weight_decay=WD)):
        p = torch.nn.Parameter(w.clone())
        p.grad = g.clone()
        make([p]).step()
        err = (p.detach() - ref.detach()).abs()
        assert err.mean() < 6e-5 and (err / (ref.detach().abs() + 1e-9)).mean() < 6e-4, "optimizer off the reference"


def time_steps(opt, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_case(n: int, threads: int, repeat: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    w = torch.randn(n)
    g = torch.randn(n) * 0.01
    makers = {
        "torch_foreach": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, foreach=True),
        "torch_fused": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, fused=True),
        "qlora_8bit": lambda ps: AdamW8bit(ps, lr=LR, weight_decay=WD),
        "qlora_32bit": lambda ps: AdamW32bit(ps, lr=LR, weight_decay=WD),
        "bitsandbytes_8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=LR, weight_decay=WD),
    }
    out = {"numel": n, "threads": threads, "seconds": {}, "state_bytes_per_param": {}}
    for name, make in makers.items():
        p = torch.nn.Parameter(w.clone())
        p.grad = g
        opt = make([p])
        reps = max(3, repeat // 3) if name == "bitsandbytes_8bit" else repeat
        out["seconds"][name] = time_steps(opt, reps)
        out["state_bytes_per_param"][name] = state_bytes(opt, p) / n
        del opt, p
    fastest = min(out["seconds"]["torch_foreach"], out["seconds"]["torch_fused"])
    out["ratio_to_fastest_torch"] = {k: v / fastest for k, v in out["seconds"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small size, few repeats (a smoke run)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "adamw.json"))
    args = ap.parse_args()
    validate()
    sizes = [1_000_000] if args.quick else [10_000_000, 100_000_000]
    repeat = 3 if args.quick else 9
    cases = []
    for n in sizes:
        for threads in (1, 2):
            r = bench_case(n, threads, repeat)
            cases.append(r)
            line = f"n={n:>11,} threads={threads}:"
            for name, sec in r["seconds"].items():
                line += f"  {name} {sec * 1e3:8.2f} ms (x{r['ratio_to_fastest_torch'][name]:.2f})"
            print(line, flush=True)
    doc = {"machine": machine(), "cases": cases}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
