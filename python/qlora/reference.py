"""Plain-PyTorch references of qlora's operators (the tests' second implementation, and the benchmark baseline).

They follow the rules of csrc/core (shared/spec/nf4-and-optimizer.md §1.3-§2.4, bitsandbytes' CUDA behaviour): scale
by the float32 reciprocal of the block absmax, nearest code with ties to the lower code (``bucketize`` on float32
midpoints), an all-zero block encodes to code 0, the pad element of an odd numel is 0 run through the same rule.
The nested (double-quantization) codes use the exact nearest map entry with ties to the lower entry; bitsandbytes'
search can break an exact tie the other way, which random data never hits.
"""

from __future__ import annotations

import torch

__all__ = ["nf4_quantize_ref", "nf4_dequantize_ref"]


def _nearest(y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    mids = (code[:-1] + code[1:]) * 0.5  # float32 midpoints
    q = torch.bucketize(y, mids, right=False)  # number of midpoints strictly below y: ties go low
    return torch.where(torch.isnan(y), torch.zeros_like(q), q).to(torch.uint8)


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
    return packed, _nearest(yq, nested_code), nested_absmax, nested_code, offset


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
