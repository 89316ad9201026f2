"""torch.ops.qlora.causal_attention / causal_attention_backward (qlora.causal_attention): values and gradients against
a float64 evaluation of Note [Causal attention] (csrc/core/attention.h), every CPU instruction set, determinism across
thread counts, layouts, segment masks, opcheck, argument errors, and the CUDA kernel when a GPU is present.

Tolerance: the kernels sum in another order than any reference and round the probabilities to the input dtype before
multiplying by V (as FlashAttention does), so each result's largest error against float64 may be at most twice that of
PyTorch's own attention (F.scaled_dot_product_attention) in the same dtype on the same inputs (shared/STYLE.md habit 6),
plus 1e-6 for float32, where SDPA's error can be close to 0 on small cases.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import qlora
from conftest import cpu_isa, requires_cuda, supported_isas

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, heads, kv_heads, tokens, head_dim, segments)
CASES = [
    (1, 2, 1, 1, 8, False),
    (1, 2, 1, 5, 8, False),
    (2, 4, 2, 70, 16, False),
    (1, 3, 3, 130, 33, True),
    (2, 6, 2, 300, 64, True),
    (1, 4, 4, 97, 128, False),
]


def segments(batch, tokens, seed=0):
    """Packed rows: three random cuts per row, ids counting up from 0 (as the trainer's packer writes them)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(batch, tokens, dtype=torch.long)
    for b in range(batch):
        for cut in torch.randint(1, max(tokens, 2), (3,), generator=g).tolist():
            seg[b, cut:] += 1
    return seg


def mask_of(tokens, seg):
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    if seg is not None:
        mask = mask & (seg[:, :, None] == seg[:, None, :])[:, None]
    return mask


def make(batch, heads, kv_heads, tokens, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q in the trainer's layout: a [B, T, H, D] projection viewed as [B, H, T, D].
    q = torch.randn(batch, tokens, heads, dim, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(batch, kv_heads, tokens, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, tokens, dim, generator=g).to(dtype)
    go = torch.randn(batch, heads, tokens, dim, generator=g).to(dtype)
    return q, k, v, go


def attention(q, k, v, go, seg, fn, dtype):
    """(out, dq, dk, dv) of fn on copies of q, k, v in `dtype`."""
    qs, ks, vs = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = fn(qs, ks, vs, seg)
    out.backward(go.to(dtype))
    return out.detach(), qs.grad, ks.grad, vs.grad


def reference(q, k, v, seg):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask_of(q.shape[2], seg)
    )


def ours(q, k, v, seg):
    return qlora.causal_attention(q, k, v, seg)


def max_err(a, ref):
    return (a.double() - ref).abs().max().item()


def check_against_reference(case, dtype, seed=0):
    b, h, kvh, t, d, with_seg = case
    q, k, v, go = make(b, h, kvh, t, d, dtype, seed)
    seg = segments(b, t, seed) if with_seg else None
    ref = attention(q, k, v, go, seg, reference, torch.float64)
    low = attention(q, k, v, go, seg, reference, dtype)
    got = attention(q, k, v, go, seg, ours, dtype)
    slack = 1e-6 if dtype == torch.float32 else 0.0
    for name, x, lo, r in zip(("out", "dq", "dk", "dv"), got, low, ref):
        assert x.dtype == dtype and x.shape == r.shape, name
        assert torch.isfinite(x).all(), name
        assert max_err(x, r) <= 2 * max_err(lo, r) + slack, (name, max_err(x, r), max_err(lo, r))
    return got


class TestValues:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("case", CASES)
    def test_against_float64(self, case, dtype):
        check_against_reference(case, dtype)

    @pytest.mark.parametrize("isa", supported_isas())
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_every_isa(self, isa, dtype):
        with cpu_isa(isa):
            check_against_reference((2, 4, 2, 75, 40, True), dtype, seed=3)

    def test_lse_is_the_log_sum_exp_of_the_visible_scores(self):
        q, k, v, _ = make(2, 4, 2, 50, 16, torch.float32, seed=1)
        seg = segments(2, 50, seed=1)
        _, lse = torch.ops.qlora.causal_attention(q, k, v, seg)
        s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(16)
        want = torch.logsumexp(s.masked_fill(~mask_of(50, seg), -math.inf), -1)
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 50)
        # float32 scores of 16 products: |error| well below 1e-5 for these magnitudes.
        assert (lse.double() - want).abs().max() < 1e-5

    def test_scale_argument(self):
        q, k, v, _ = make(1, 2, 1, 40, 16, torch.float32, seed=2)
        got = qlora.causal_attention(q, k, v, scale=0.3)
        want = F.scaled_dot_product_attention(q.double(), *(t.double().repeat_interleave(2, 1) for t in (k, v)),
                                              is_causal=True, scale=0.3)
        assert max_err(got, want) < 1e-6

    def test_int32_and_int64_segments_agree(self):
        q, k, v, _ = make(2, 2, 1, 60, 8, torch.float32, seed=4)
        seg = segments(2, 60, seed=4)
        a = qlora.causal_attention(q, k, v, seg)
        b = qlora.causal_attention(q, k, v, seg.int())
        assert torch.equal(a, b)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_nan_input_gives_nan_not_a_silent_zero(self, dtype):
        q, k, v, _ = make(1, 2, 1, 40, 16, dtype, seed=9)
        k = k.clone()
        k[0, 0, 3, 5] = float("nan")  # key 3: every query from 3 on sees it
        out = qlora.causal_attention(q, k, v)
        assert torch.isfinite(out[:, :, :3]).all()
        assert torch.isnan(out[:, :, 3:]).all(dim=-1).all()

    def test_one_segment_is_plain_causal(self):
        q, k, v, _ = make(2, 4, 2, 70, 16, torch.bfloat16, seed=5)
        seg = torch.full((2, 70), 7, dtype=torch.long)
        assert torch.equal(qlora.causal_attention(q, k, v, seg), qlora.causal_attention(q, k, v))


class TestLayoutAndDeterminism:
    def test_output_is_stored_token_major(self):
        q, k, v, _ = make(2, 4, 2, 33, 16, torch.float32)
        out = qlora.causal_attention(q, k, v)
        assert out.shape == (2, 4, 33, 16)
        assert out.transpose(1, 2).is_contiguous()  # so the o_proj input reshape is a view

    def test_any_input_strides(self):
        q, k, v, _ = make(1, 4, 2, 45, 24, torch.float32, seed=6)
        base = qlora.causal_attention(q.contiguous(), k, v)
        # q contiguous [B, H, T, D]; k a [B, T, KVH, D] view; v with a non-contiguous last dimension.
        k2 = k.transpose(1, 2).contiguous().transpose(1, 2)
        v2 = v.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not v2.is_contiguous() and v2.stride(-1) != 1
        assert torch.equal(qlora.causal_attention(q, k2, v2), base)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_thread_count_does_not_change_bits(self, dtype):
        q, k, v, go = make(2, 6, 2, 200, 64, dtype, seed=7)
        seg = segments(2, 200, seed=7)
        saved = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = attention(q, k, v, go, seg, ours, dtype)
            torch.set_num_threads(2)
            two = attention(q, k, v, go, seg, ours, dtype)
        finally:
            torch.set_num_threads(saved)
        for a, b in zip(one, two):
            assert torch.equal(a, b)

    def test_lse_is_not_differentiable(self):
        q, k, v, _ = make(1, 2, 1, 10, 8, torch.float32)
        q.requires_grad_()
        out, lse = torch.ops.qlora.causal_attention(q, k, v)
        assert not lse.requires_grad and out.requires_grad


class TestOpcheck:
    @pytest.mark.parametrize("with_seg", [False, True])
    def test_forward(self, with_seg):
        q, k, v, _ = make(1, 4, 2, 20, 8, torch.float32)
        seg = segments(1, 20) if with_seg else None
        q.requires_grad_()
        torch.library.opcheck(torch.ops.qlora.causal_attention.default, (q, k, v, seg, None))

    def test_backward(self):
        q, k, v, go = make(1, 4, 2, 20, 8, torch.float32)
        out, lse = torch.ops.qlora.causal_attention(q, k, v)
        torch.library.opcheck(torch.ops.qlora.causal_attention_backward.default, (go, q, k, v, out, lse, None, 0.5))


class TestErrors:
    def call(self, *args):
        return torch.ops.qlora.causal_attention(*args)

    def test_messages(self):
        q, k, v, _ = make(1, 4, 2, 8, 8, torch.float32)
        bad = [
            ((q.double(), k, v), "q must be float32, bfloat16 or float16"),
            ((q[0], k, v), "q must be \\[batch, heads, tokens, head_dim\\]"),
            ((q, k.half(), v), "k must have q's dtype"),
            ((q, k, v[:, :1]), "k and v must have one shape"),
            ((q, k[:, :, :5], v[:, :, :5]), "k must be \\[batch, kv_heads, tokens, head_dim\\]"),
            ((q[:, :3], k, v), "must be a multiple of k's"),
            ((q, k, v, torch.zeros(1, 7, dtype=torch.long)), "segment_ids must be \\[batch, tokens\\]"),
            ((q, k, v, torch.zeros(1, 8)), "segment_ids must be int32 or int64"),
            ((q, k, v, torch.full((1, 8), 2**40)), "segment_ids must fit in int32"),
            ((q, k, v, None, math.inf), "scale must be finite"),
        ]
        for args, msg in bad:
            with pytest.raises(RuntimeError, match=msg):
                self.call(*args)

    def test_backward_messages(self):
        q, k, v, go = make(1, 4, 2, 8, 8, torch.float32)
        out, lse = torch.ops.qlora.causal_attention(q, k, v)
        with pytest.raises(RuntimeError, match="lse must be float32 \\[batch, heads, tokens\\]"):
            torch.ops.qlora.causal_attention_backward(go, q, k, v, out, lse[:, :2])
        with pytest.raises(RuntimeError, match="grad_out and out must have q's shape"):
            torch.ops.qlora.causal_attention_backward(go[:, :, :4], q, k, v, out, lse)

    def test_empty_inputs(self):
        q, k, v, go = make(2, 4, 2, 0, 8, torch.float32)
        out, lse = torch.ops.qlora.causal_attention(q, k, v)
        assert out.shape == (2, 4, 0, 8) and lse.shape == (2, 4, 0)


@requires_cuda
class TestCuda:
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_against_float64(self, dtype):
        b, h, kvh, t, d = 2, 4, 2, 90, 64
        q, k, v, go = make(b, h, kvh, t, d, dtype, seed=8)
        seg = segments(b, t, seed=8)
        ref = attention(q, k, v, go, seg, reference, torch.float64)
        low = attention(q, k, v, go, seg, reference, dtype)
        cu = [x.cuda() for x in (q, k, v, go)]
        got = attention(*cu, seg.cuda(), ours, dtype)
        for x, lo, r in zip(got, low, ref):
            assert x.is_cuda
            assert max_err(x.cpu(), r) <= 2 * max_err(lo, r) + (1e-6 if dtype == torch.float32 else 0.0)
