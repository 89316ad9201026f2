"""AdamW step time and state memory on the CPU: qlora's 8-bit and 32-bit AdamW vs torch.optim.AdamW (foreach and
fused, float32 states) vs bitsandbytes' AdamW8bit (its CPU backend).

    .venv/bin/python bench/bench_adamw.py [--quick] [--out bench/results/adamw.json]

One float32 parameter of 10 M and 100 M elements, gradient randn * 0.01, lr 1e-3, weight decay 1e-2, 1 and 2 threads,
all in this one process. Before timing, every implementation is validated: qlora's 8-bit step equals the plain-PyTorch
reference (qlora.reference) bit for bit on a 1 Mi-element slice, and one step of each optimizer stays within
bitsandbytes' test tolerance of torch's AdamW (spec §4.8). The optimizers step in interleaved rounds after three warm-up
steps each (states are non-zero by then), so a slow phase of a shared machine slows all of them alike; times are
medians over the rounds and each ratio is the median of its per-round ratios to the fastest torch AdamW of that round.
State memory is bytes of optimizer state per parameter.

Then where the 8-bit step's time goes (one thread, 32 Ki elements so the data stays in the L2 cache): build/bin/
bench_adamw_parts (bench/adamw_parts.cpp, built by scripts/setup.sh) times the 8-bit step, the 32-bit step and, alone,
the decoding and encoding of both 8-bit moments, each checked against the scalar kernels first; torch's fused AdamW
kernel is timed on tensors of the same size here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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


def time_step(opt) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def bench_case(n: int, threads: int, repeat: int) -> dict:
    """Interleaved rounds: every optimizer steps once per round, so a slow phase of this (shared, virtual) machine hits
    all of them alike. Times are medians over rounds; ratios are medians of the per-round ratios."""
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
    out = {"numel": n, "threads": threads, "rounds": repeat, "seconds": {}, "state_bytes_per_param": {}}
    opts = {}
    for name, make in makers.items():
        p = torch.nn.Parameter(w.clone())
        p.grad = g
        opts[name] = make([p])
        for _ in range(3):  # warm-up: states are non-zero by the first timed step
            opts[name].step()
        out["state_bytes_per_param"][name] = state_bytes(opts[name], p) / n
    slow_rounds = max(3, repeat // 3)  # bitsandbytes' CPU step takes seconds at 100 M
    times = {name: [] for name in makers}
    ratios = {name: [] for name in makers}
    for r in range(repeat):
        this = {name: time_step(opt) for name, opt in opts.items() if name != "bitsandbytes_8bit" or r < slow_rounds}
        fastest = min(this["torch_foreach"], this["torch_fused"])
        for name, sec in this.items():
            times[name].append(sec)
            ratios[name].append(sec / fastest)
    out["seconds"] = {k: statistics.median(v) for k, v in times.items()}
    out["ratio_to_fastest_torch"] = {k: statistics.median(v) for k, v in ratios.items()}
    return out


PARTS_BIN = os.environ.get("QLORA_BENCH_ADAMW_PARTS",
                           os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "bin",
                                        "bench_adamw_parts"))


def bench_parts(rounds: int) -> dict:
    """The C++ parts benchmark plus torch's fused AdamW kernel (torch._fused_adamw_, the op that AdamW(fused=True)
    calls, without the optimizer's Python overhead, which at this size would be most of the time) on float32 tensors
    of the same size, one thread. The op's fixed cost per call (Python and dispatcher, measured on 16 elements) is
    subtracted, which can only make torch look faster."""
    try:
        out = subprocess.run([PARTS_BIN, "--rounds", str(rounds)], check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"{PARTS_BIN} failed: {e.stderr.strip()}") from e
    doc = json.loads(out)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    def fused_time(n: int, check: bool = False) -> float:
        p, g = torch.randn(n), torch.randn(n) * 0.01
        m, v, step = torch.zeros(n), torch.zeros(n), torch.tensor(0.0)

        def one() -> float:
            step.add_(1)
            t0 = time.perf_counter()
            torch._fused_adamw_([p], [g], [m], [v], [], [step], lr=LR, beta1=0.9, beta2=0.999, weight_decay=WD,
                                eps=1e-8, amsgrad=False, maximize=False)
            return time.perf_counter() - t0

        if check:  # the op is the AdamW the validation above checks: one step equals torch.optim.AdamW(fused=True)'s
            ref = torch.nn.Parameter(p.clone())
            ref.grad = g
            torch.optim.AdamW([ref], lr=LR, weight_decay=WD, fused=True).step()
            one()
            assert torch.equal(p, ref.detach()), "torch._fused_adamw_ differs from torch.optim.AdamW(fused=True)"
        for _ in range(3):
            one()
        return statistics.median(one() for _ in range(rounds))

    n = doc["elements"]
    per_call = fused_time(16)
    doc["torch_fused_seconds_per_call"] = per_call
    doc["ns_per_element"]["torch_fused_kernel"] = (fused_time(n, check=True) - per_call) / n * 1e9
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small size, few repeats (a smoke run)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "adamw.json"))
    args = ap.parse_args()
    if not os.path.exists(PARTS_BIN):
        raise SystemExit(f"{PARTS_BIN}: not built (scripts/setup.sh builds it; or set QLORA_BENCH_ADAMW_PARTS)")
    validate()
    sizes = [1_000_000] if args.quick else [10_000_000, 100_000_000]
    repeat = 3 if args.quick else 15
    cases = []
    for n in sizes:
        for threads in (1, 2):
            r = bench_case(n, threads, repeat)
            cases.append(r)
            line = f"n={n:>11,} threads={threads}:"
            for name, sec in r["seconds"].items():
                line += f"  {name} {sec * 1e3:8.2f} ms (x{r['ratio_to_fastest_torch'][name]:.2f})"
            print(line, flush=True)
    parts = bench_parts(31 if args.quick else 301)
    print("parts, ns per element (1 thread, %d elements): %s" % (parts["elements"], ", ".join(
        f"{k} {v:.3f}" for k, v in parts["ns_per_element"].items())), flush=True)
    doc = {"machine": machine(), "cases": cases, "parts": parts}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
