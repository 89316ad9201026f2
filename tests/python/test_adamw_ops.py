"""The optimizer ops torch.ops.qlora.adamw8bit_step / adamw32bit_step / paged_zeros / paged_prefetch.

Every CPU ISA must give the bytes of qlora.reference (a plain-PyTorch restatement of Note [AdamW8 update order],
each float32 operation a separate torch op); the spec's edge rules (shared/spec/nf4-and-optimizer.md §4.3, §10.4
item 16, §10.3 item 11) are checked directly; opcheck covers the schemas, Meta kernels and mutation annotations."""

import pytest
import torch

from qlora.reference import adamw8bit_step_ref, adamw32bit_step_ref, adamw_scalars

from conftest import cpu_isa, requires_cuda, supported_isas

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 255, 256, 257, 4096, 10000, 70001]
QMAP1 = torch.ops.qlora.dynamic8_code(True)
QMAP2 = torch.ops.qlora.dynamic8_code(False)


def fresh8(n, device="cpu"):
    nb = -(-n // 256)
    u8 = dict(dtype=torch.uint8, device=device)
    return [torch.zeros(n, **u8), torch.zeros(n, **u8), torch.zeros(nb, device=device), torch.zeros(nb, device=device)]


def gradient(n, dtype, step):
    g = torch.randn(n) * 0.01
    if step == 2 and n > 600:
        g[256:512] = 0  # a whole block of zero gradients (absmax 0 on the first steps)
    if step == 3:
        g[min(5, n - 1)] = float("nan")
        g[n // 2] = float("inf")
        g[n - 1] = -float("inf")
    return g.to(dtype)


def same_bits(a, b):
    if a.dtype == torch.uint8:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def run_steps(n, dtype, qmap1=QMAP1, qmap2=QMAP2, wd=0.01, steps=4):
    p = torch.randn(n).to(dtype)
    state = fresh8(n)
    for t in range(1, steps + 1):
        g = gradient(n, dtype, t)
        want = adamw8bit_step_ref(p, g, *state, qmap1, qmap2, t, 1e-3, 0.9, 0.999, 1e-8, wd)
        torch.ops.qlora.adamw8bit_step(p, g, *state, qmap1, qmap2, t, 1e-3, 0.9, 0.999, 1e-8, wd)
        for name, got, ref in zip(["param", "state1", "state2", "absmax1", "absmax2"], [p, *state], want):
            assert same_bits(got, ref), f"{name} differs at step {t} (n={n}, {dtype})"


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_adamw8_matches_reference(isa, dtype, n):
    with cpu_isa(isa):
        run_steps(n, dtype)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw8_matches_reference_with_and_without_decay(wd):
    run_steps(5000, torch.float32, wd=wd)


def test_adamw8_other_maps():
    # A map 1 ulp off in a few entries (bitsandbytes' scalar-path generator) takes the table path; a signed map that is
    # not mirror-symmetric takes the binary search; both follow the reference.
    m2 = QMAP2.clone()
    m2[[30, 90, 200]] = torch.nextafter(m2[[30, 90, 200]], torch.tensor(2.0))
    run_steps(3000, torch.float32, qmap2=m2)
    m1 = QMAP1.clone()
    m1[10] = torch.nextafter(m1[10], torch.tensor(0.0))
    run_steps(3000, torch.float32, qmap1=m1)


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 17, 4096, 70001])
def test_adamw32_matches_reference(isa, dtype, n):
    with cpu_isa(isa):
        p = torch.randn(n).to(dtype)
        m, v = torch.zeros(n), torch.zeros(n)
        for t in range(1, 5):
            g = gradient(n, dtype, t)
            want = adamw32bit_step_ref(p, g, m, v, t, 1e-3, 0.9, 0.999, 1e-8, 0.01)
            torch.ops.qlora.adamw32bit_step(p, g, m, v, t, 1e-3, 0.9, 0.999, 1e-8, 0.01)
            for got, ref in zip([p, m, v], want):
                assert same_bits(got, ref)


def test_nonfinite_gradient_resets_moments_and_keeps_param():
    n = 1024
    p = torch.randn(n)
    state = fresh8(n)
    for t in (1, 2):
        torch.ops.qlora.adamw8bit_step(p, torch.randn(n) * 0.01, *state, QMAP1, QMAP2, t, 1e-3)
    g = torch.randn(n) * 0.01
    bad = torch.tensor([3, 300, 700])
    g[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    before = p.clone()
    torch.ops.qlora.adamw8bit_step(p, g, *state, QMAP1, QMAP2, 3, 1e-3, weight_decay=0.1)
    assert torch.equal(p[bad], before[bad])
    m = QMAP1[state[0].long()] * state[2].repeat_interleave(256)
    v = QMAP2[state[1].long()] * state[3].repeat_interleave(256)
    assert torch.all(m[bad] == 0) and torch.all(v[bad] == 0)
    assert torch.isfinite(p).all() and torch.isfinite(state[2]).all() and torch.isfinite(state[3]).all()
    good = torch.ones(n, dtype=torch.bool)
    good[bad] = False
    assert torch.all(p[good] != before[good])  # the rest of the tensor was updated


def test_negative_first_moment_never_encodes_to_plus_zero():
    # Tiny negative moments next to a large one: without the sign fix they round to code 127 (+0).
    n = 256
    p = torch.zeros(n)
    g = -torch.rand(n) * 1e-9
    g[0] = 1.0
    state = fresh8(n)
    torch.ops.qlora.adamw8bit_step(p, g, *state, QMAP1, QMAP2, 1, 1e-3)
    q1 = state[0]
    assert (q1[1:] == 126).any(), "the case was not exercised"
    assert not (q1[1:] == 127).any()
    assert torch.all(QMAP1[q1[1:].long()] < 0)


def test_decay_is_applied_after_the_update():
    # spec §4.4 / §10.3 item 11: p <- T(T(p + delta) * (1 - lr*wd)), not torch's decay-first order.
    n, lr, wd = 4096, 1e-2, 0.5
    p = torch.randn(n).to(torch.bfloat16)
    g = (torch.randn(n) * 0.01).to(torch.bfloat16)
    state = fresh8(n)
    s = adamw_scalars(lr, 0.9, 0.999, 1e-8, wd, 1)
    m = s["one_minus_beta1"] * g.float()
    v = (s["one_minus_beta2"] * g.float()) * g.float()
    delta = s["step_size"] * (m / (torch.sqrt(v.double()).float() + s["eps_hat"]))
    after = ((p.float() + delta).bfloat16().float() * s["decay"]).bfloat16()
    before = ((p.float() * s["decay"]).bfloat16().float() + delta).bfloat16()
    assert not torch.equal(after, before), "the two orders must differ on this input"
    torch.ops.qlora.adamw8bit_step(p, g, *state, QMAP1, QMAP2, 1, lr, weight_decay=wd)
    assert torch.equal(p, after)


def test_errors_name_the_argument():
    n = 300
    p, g = torch.randn(n), torch.randn(n)
    s = fresh8(n)
    step = torch.ops.qlora.adamw8bit_step
    with pytest.raises(RuntimeError, match="grad must have param's dtype Float, got BFloat16"):
        step(p, g.bfloat16(), *s, QMAP1, QMAP2, 1, 1e-3)
    with pytest.raises(RuntimeError, match=r"absmax1 must have 2 elements, got 1"):
        step(p, g, s[0], s[1], torch.zeros(1), s[3], QMAP1, QMAP2, 1, 1e-3)
    with pytest.raises(RuntimeError, match="state2 must be Byte, got Float"):
        step(p, g, s[0], torch.zeros(n), s[2], s[3], QMAP1, QMAP2, 1, 1e-3)
    with pytest.raises(RuntimeError, match="step must be >= 1"):
        step(p, g, *s, QMAP1, QMAP2, 0, 1e-3)
    with pytest.raises(RuntimeError, match=r"beta2 must be in \[0, 1\), got 1"):
        step(p, g, *s, QMAP1, QMAP2, 1, 1e-3, 0.9, 1.0)
    with pytest.raises(RuntimeError, match="param must be float32, bfloat16 or float16, got Double"):
        step(p.double(), g.double(), *s, QMAP1, QMAP2, 1, 1e-3)
    with pytest.raises(RuntimeError, match="qmap1 must have 256 elements"):
        step(p, g, *s, QMAP1[:255], QMAP2, 1, 1e-3)
    with pytest.raises(RuntimeError, match="param must be contiguous"):
        step(torch.randn(20, 15).t(), torch.randn(15, 20), *s, QMAP1, QMAP2, 1, 1e-3)
    with pytest.raises(RuntimeError, match="exp_avg_sq must have 300 elements, got 299"):
        torch.ops.qlora.adamw32bit_step(p, g, torch.zeros(n), torch.zeros(n - 1), 1, 1e-3)


def test_paged_zeros_on_cpu_is_ordinary_zeroed_memory():
    like = torch.randn(3, 5, dtype=torch.bfloat16)
    z = torch.ops.qlora.paged_zeros(like, torch.uint8)
    assert z.shape == like.shape and z.dtype == torch.uint8 and z.device == like.device and not z.any()
    torch.ops.qlora.paged_prefetch(z)  # a no-op on the CPU, must not fail


def test_opcheck():
    n = 700
    p, g = torch.randn(n), torch.randn(n) * 0.01
    torch.library.opcheck(torch.ops.qlora.adamw8bit_step.default, (p, g, *fresh8(n), QMAP1, QMAP2, 1, 1e-3))
    torch.library.opcheck(
        torch.ops.qlora.adamw32bit_step.default, (p.bfloat16(), g.bfloat16(), torch.zeros(n), torch.zeros(n), 2, 1e-3)
    )
    torch.library.opcheck(torch.ops.qlora.paged_zeros.default, (p, torch.uint8))


@requires_cuda
def test_cuda_matches_cpu():
    n = 70001
    for dtype in DTYPES:
        p = torch.randn(n).to(dtype)
        state = fresh8(n)
        pc, sc = p.cuda(), [t.cuda() for t in state]
        for t in range(1, 4):
            g = gradient(n, dtype, t)
            torch.ops.qlora.adamw8bit_step(p, g, *state, QMAP1, QMAP2, t, 1e-3, weight_decay=0.01)
            torch.ops.qlora.adamw8bit_step(pc, g.cuda(), *sc, QMAP1.cuda(), QMAP2.cuda(), t, 1e-3, weight_decay=0.01)
        for a, b in zip([p, *state], [pc, *sc]):
            assert same_bits(a, b.cpu())


@requires_cuda
def test_cuda_paged_zeros_is_managed_and_zeroed():
    like = torch.empty(1000, 1000, device="cuda")
    z = torch.ops.qlora.paged_zeros(like, torch.uint8)
    torch.ops.qlora.paged_prefetch(z)
    assert z.device == like.device and not z.any()

