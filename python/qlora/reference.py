"""Plain-PyTorch references of qlora's operators (the tests' second implementation, and the benchmark baseline).

They follow the rules of csrc/core (shared/spec/nf4-and-optimizer.md §1.3-§2.4, bitsandbytes' CUDA behaviour): scale
by the float32 reciprocal of the block absmax, nearest code with ties to the lower code (``bucketize`` on float32
midpoints), an all-zero block encodes to code 0, the pad element of an odd numel is 0 run through the same rule.
The nested (double-quantization) codes follow bitsandbytes' binary search step by step (spec §2.3), because exact
ties at a float32 midpoint are common there (about one in 2^18 absmax values) and the search breaks them toward its
final pivot, which may be the upper entry.
"""

from __future__ import annotations

import torch

__all__ = ["nf4_quantize_ref", "nf4_dequantize_ref"]


def _nearest(y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    mids = (code[:-1] + code[1:]) * 0.5  # float32 midpoints
    q = torch.bucketize(y, mids, right=False)  # number of midpoints strictly below y: ties go low
    return torch.where(torch.isnan(y), torch.zeros_like(q), q).to(torch.uint8)


def _dynamic8_encode(y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' search (`dQuantize<0>`), vectorised: pivots 127 +- 64, 32, ..., 1 on a strict `y > code[pivot]`,
    then the final pivot or its bracketing neighbour by comparison with their float32 midpoint."""
    full = lambda v, dt: torch.full_like(y, v, dtype=dt)  # noqa: E731
    pivot, upper_pivot, lower_pivot = full(127, torch.long), full(255, torch.long), full(0, torch.long)
    lower, upper = full(-1.0, torch.float32), full(1.0, torch.float32)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = y > val
        lower_pivot, lower = torch.where(gt, pivot, lower_pivot), torch.where(gt, val, lower)
        upper_pivot, upper = torch.where(gt, upper_pivot, pivot), torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    up = torch.where(y > (upper + val) * 0.5, upper_pivot, pivot)
    lo = torch.where(y < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(y > val, up, lo).to(torch.uint8)


def nf4_quantize_ref(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True, nested_code=None):
    """Returns (packed, absmax, nested_absmax, nested_code, offset) like torch.ops.qlora.nf4_quantize."""
    code = torch.ops.qlora.nf4_code().to(weight.device)
    x = weight.detach().reshape(-1).float()
    n = x.numel()
    nb = -(-n // blocksize)
    padded = torch.zeros(nb * blocksize + 1, dtype=torch.float32, device=x.device)
    padded[:n] = x
    blocks = padded[: nb * blocksize].view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.reciprocal(absmax)  # inf for an all-zero block -> 0 * inf = NaN -> code 0
    y = blocks * scale[:, None]
    q = _nearest(y.reshape(-1), code)[: n + (n % 2)]
    packed = ((q[0::2] << 4) | q[1::2]).reshape(-1, 1)
    f32 = dict(dtype=torch.float32, device=x.device)
    if not double_quant:
        return packed, absmax, torch.empty(0, **f32), torch.empty(0, **f32), torch.empty(0, **f32)
    nested_code = torch.ops.qlora.dynamic8_code(True).to(x.device) if nested_code is None else nested_code
    offset = absmax.mean()
    centred = absmax - offset
    nb2 = -(-nb // 256)
    c = torch.zeros(nb2 * 256, **f32)
    c[:nb] = centred
    nested_absmax = c.view(nb2, 256).abs().amax(dim=1)
    yq = (c.view(nb2, 256) * torch.reciprocal(nested_absmax)[:, None]).reshape(-1)[:nb]
    return packed, _dynamic8_encode(yq, nested_code), nested_absmax, nested_code, offset


def nf4_dequantize_ref(packed, absmax, nested_absmax, nested_code, offset, shape, dtype, blocksize=64):
    code = torch.ops.qlora.nf4_code().to(packed.device)
    n = torch.Size(shape).numel()
    if absmax.dtype == torch.uint8:
        nb = absmax.numel()
        absmax = nested_code[absmax.long()] * nested_absmax.repeat_interleave(256)[:nb] + offset
    p = packed.reshape(-1)
    q = torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)[:n].long()
    vals = code[q] * absmax.repeat_interleave(blocksize)[:n]
    return vals.reshape(shape).to(dtype)
