"""Plain-PyTorch references of qlora's operators (the tests' second implementation, and the benchmark baseline).

They follow the rules of csrc/core (shared/spec/nf4-and-optimizer.md §1.3-§2.4, bitsandbytes' CUDA behaviour): scale
by the float32 reciprocal of the block absmax, nearest code with ties to the lower code (``bucketize`` on float32
midpoints), an all-zero block encodes to code 0, the pad element of an odd numel is 0 run through the same rule.
The nested (double-quantization) codes follow bitsandbytes' binary search step by step (spec §2.3), because exact
ties at a float32 midpoint are common there (about one in 2^18 absmax values) and the search breaks them toward its
final pivot, which may be the upper entry.
"""

from __future__ import annotations

import math

import torch

__all__ = ["nf4_quantize_ref", "nf4_dequantize_ref", "adamw_scalars", "adamw8bit_step_ref", "adamw32bit_step_ref"]


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


# ---------------------------------------------------------------------------------------------------------------------
# AdamW (csrc/core/adamw.h, Note [AdamW8 update order]; spec §4.3-§4.5). Every float32 operation is a separate torch op,
# so each rounds once, as in the kernels.


def adamw_scalars(lr, beta1, beta2, eps, weight_decay, step):
    """The per-step float32 constants: computed in double precision, each rounded once (core::adamw_scalars)."""
    bias1 = 1.0 - beta1**step
    bias2_sqrt = math.sqrt(1.0 - beta2**step)
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return dict(
        beta1=f(beta1),
        one_minus_beta1=f(1.0 - beta1),
        beta2=f(beta2),
        one_minus_beta2=f(1.0 - beta2),
        step_size=f(-lr * bias2_sqrt / bias1),
        eps_hat=f(eps * bias2_sqrt),
        decay=f(1.0 - lr * weight_decay),
        has_decay=weight_decay != 0.0,
    )


def _adamw_moments(m, v, g, s):
    finite = torch.isfinite(g)
    g = torch.where(finite, g, torch.zeros_like(g))
    m = m * s["beta1"] + s["one_minus_beta1"] * g
    v = v * s["beta2"] + (s["one_minus_beta2"] * g) * g
    zero = torch.zeros_like(m)
    return torch.where(finite, m, zero), torch.where(finite, v, zero), finite


def _adamw_param(param, m, v, finite, s):
    p = param.reshape(-1)
    # Correctly rounded sqrt: torch's vectorised float32 sqrt (Sleef, 0.5001 ulp) is not; in float64 it is exact
    # enough that rounding to float32 gives the correctly rounded float32 root.
    sqrt_v = torch.sqrt(v.double()).float()
    delta = s["step_size"] * (m / (sqrt_v + s["eps_hat"]))
    new = (p.float() + delta).to(p.dtype)
    if s["has_decay"]:
        new = (new.float() * s["decay"]).to(p.dtype)
    return torch.where(finite, new, p).reshape(param.shape)


def adamw8bit_step_ref(param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, step, lr, beta1=0.9, beta2=0.999,
                       eps=1e-8, weight_decay=0.0):
    """One 8-bit blockwise AdamW step; returns new (param, state1, state2, absmax1, absmax2) like
    torch.ops.qlora.adamw8bit_step leaves them (the inputs are not modified)."""
    s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    n = param.numel()
    nb = -(-n // 256)
    q1, q2 = state1.reshape(-1).long(), state2.reshape(-1).long()
    m = qmap1[q1] * absmax1.repeat_interleave(256)[:n]
    v = qmap2[q2] * absmax2.repeat_interleave(256)[:n]
    m, v, finite = _adamw_moments(m, v, grad.reshape(-1).float(), s)
    am1 = torch.zeros(nb * 256)
    am1[:n] = m.abs()
    if n % 256:  # padding lanes of the tail block: g = 0, state1 code 128 (core::adamw8_padding_m)
        am1[n:] = (qmap1[128] * absmax1[-1] * s["beta1"] + s["one_minus_beta1"] * torch.zeros(())).abs()
    am2 = torch.zeros(nb * 256)
    am2[:n] = v.abs()
    new_absmax1 = am1.view(nb, 256).amax(dim=1)
    new_absmax2 = am2.view(nb, 256).amax(dim=1)
    new_param = _adamw_param(param, m, v, finite, s)
    scale1 = torch.reciprocal(new_absmax1).repeat_interleave(256)[:n]  # block_scale: correctly rounded 1/absmax
    scale2 = torch.reciprocal(new_absmax2).repeat_interleave(256)[:n]
    c1 = _dynamic8_encode(m * scale1, qmap1).long()
    differ = torch.signbit(qmap1[c1]) != torch.signbit(m)
    c1 = torch.where(differ, (c1 + torch.where(m > 0, 1, -1)) % 256, c1)
    c2 = _dynamic8_encode(v * scale2, qmap2)
    return (new_param, c1.to(torch.uint8).reshape(state1.shape), c2.reshape(state2.shape), new_absmax1,
            new_absmax2)


def adamw32bit_step_ref(param, grad, exp_avg, exp_avg_sq, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.0):
    """One 32-bit AdamW step; returns new (param, exp_avg, exp_avg_sq)."""
    s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    m, v, finite = _adamw_moments(exp_avg.reshape(-1), exp_avg_sq.reshape(-1), grad.reshape(-1).float(), s)
    return _adamw_param(param, m, v, finite, s), m.reshape(exp_avg.shape), v.reshape(exp_avg_sq.shape)
