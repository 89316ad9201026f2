"""Quantize a Llama-7B-sized projection to NF4 with qlora's operators and check the round trip.

    .venv/bin/python examples/nf4_python/quantize.py [--rows 11008] [--cols 4096] [--dtype bfloat16]

Prints the storage cost (bits per parameter, with and without double quantization), the reconstruction error next
to bitsandbytes' published figure, the bitsandbytes checkpoint keys the weight would be saved under, and timings.
Uses torch and qlora only.
"""

import argparse
import time

import torch

import qlora


def timed(fn, repeat=5):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols).to(dtype)
    print(f"weight {tuple(w.shape)} {args.dtype}: {w.numel() * w.element_size() / 2**20:.1f} MiB, "
          f"CPU kernels: {torch.ops.qlora.cpu_isa()}, threads: {torch.get_num_threads()}")
    for dq in (False, True):
        q = qlora.quantize_nf4(w, blocksize=64, double_quant=dq)
        back = q.dequantize()
        err = (back.float() - w.float()).abs().mean().item()
        bits = 8 * (q.nbytes() + 64) / w.numel()
        label = ("NF4 + double quant" if dq else "NF4").ljust(18)
        print(f"  {label}: {q.nbytes() / 2**20:7.2f} MiB, {bits:.4f} bits/param, mean |error| {err:.5f} "
              f"(bitsandbytes: 0.0728 for N(0,1))")
    q = qlora.quantize_nf4(w)
    keys = q.to_bnb_state_dict("model.layers.0.mlp.up_proj.weight")
    print("  checkpoint keys (bitsandbytes / Hugging Face layout):")
    for k, v in keys.items():
        print(f"    {k:70s} {str(v.dtype):14s} {tuple(v.shape)}")
    tq = timed(lambda: qlora.quantize_nf4(w))
    td = timed(lambda: q.dequantize())
    gb = w.numel() * w.element_size() / 1e9
    print(f"  quantize {tq * 1e3:.1f} ms ({gb / tq:.2f} GB/s of {args.dtype} read), "
          f"dequantize {td * 1e3:.1f} ms ({gb / td:.2f} GB/s written)")


if __name__ == "__main__":
    main()
