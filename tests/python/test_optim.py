"""qlora.optim against torch.optim.AdamW (bitsandbytes' own tolerances, shared/spec/nf4-and-optimizer.md §4.8 and
§10.3), against bitsandbytes' AdamW8bit on the CPU, and for exact resumption: a run saved (through safetensors) and
reloaded into a fresh optimizer continues bit for bit, and paged and non-paged optimizers load each other's states."""

import copy
import os

import pytest
import torch

import qlora
from qlora.optim import (
    AdamW8bit,
    AdamW32bit,
    PagedAdamW,
    PagedAdamW8bit,
    PagedAdamW32bit,
    state_dict_from_tensors,
    state_dict_to_tensors,
)


def dequantized_states(state):
    n = state["state1"].numel()
    m = state["qmap1"][state["state1"].long()].reshape(-1) * state["absmax1"].repeat_interleave(256)[:n]
    v = state["qmap2"][state["state2"].long()].reshape(-1) * state["absmax2"].repeat_interleave(256)[:n]
    return m.reshape(state["state1"].shape), v.reshape(state["state2"].shape)


# Tolerances of bitsandbytes' test_optimizer8bit (spec §4.8): parameter error means, by gradient dtype.
PARAM_BOUNDS = {torch.float32: (6e-5, 6e-4), torch.float16: (6e-5, 6e-4), torch.bfloat16: (1.7e-4, 1.6e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d2", [32, 1024, 4097])
def test_8bit_tracks_torch_adamw(dtype, d2):
    p2 = torch.nn.Parameter((torch.randn(1024, d2) * 0.1).to(dtype))
    p1 = torch.nn.Parameter(p2.detach().float())  # reference, float32, from the same (rounded) start
    ref = torch.optim.AdamW([p1], lr=1e-3, weight_decay=0.0)
    opt = AdamW8bit([p2], lr=1e-3, weight_decay=0.0)
    err_bound, rel_bound = PARAM_BOUNDS[dtype]
    for step in range(1, 51):
        g = torch.randn(1024, d2) * 0.01
        p1.grad, p2.grad = g.clone(), g.to(dtype)
        ref.step()
        opt.step()
        m, v = dequantized_states(opt.state[p2])
        bad_m = (~torch.isclose(m, ref.state[p1]["exp_avg"], atol=3e-3, rtol=1e-3)).sum()
        bad_v = (~torch.isclose(v, ref.state[p1]["exp_avg_sq"], atol=3e-3, rtol=1e-3)).sum()
        assert bad_m < 20 and bad_v < 20, f"step {step}: {bad_m}, {bad_v} state elements off"
        err = (p1.detach() - p2.detach().float()).abs()
        rel = (err / (p1.detach().abs() + 1e-9)).mean()
        assert err.mean() < err_bound, f"step {step}: mean |dp| {err.mean():.3g}"
        # For 16-bit parameters most of the error is rounding the new value to the parameter dtype, which no optimizer
        # avoids: allow 10 % above what rounding torch's own float32 result to that dtype gives, if that exceeds
        # bitsandbytes' bound (it does for bfloat16 with round-to-nearest: ~1.7e-3 against their 1.6e-3).
        rounding = ((p1.detach() - p1.detach().to(dtype).float()).abs() / (p1.detach().abs() + 1e-9)).mean()
        assert rel < max(rel_bound, 1.1 * rounding), f"step {step}: mean relative {rel:.3g}, rounding {rounding:.3g}"
        if step % 10 == 0:  # checkpoint round trip: raw states and maps exactly, then continue from the copy
            fresh = AdamW8bit([p2], lr=1e-3, weight_decay=0.0)
            fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
            for key in ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"):
                assert torch.equal(fresh.state[p2][key], opt.state[p2][key])
            opt = fresh
        # As bitsandbytes' test: re-sync so errors do not accumulate across steps.
        with torch.no_grad():
            p1.copy_(p2.float())
            ref.state[p1]["exp_avg"].copy_(m)
            ref.state[p1]["exp_avg_sq"].copy_(v)


@pytest.mark.parametrize("cls", [AdamW32bit, PagedAdamW32bit])
@pytest.mark.parametrize("d2", [1, 32, 1024, 4097])
def test_32bit_matches_torch_adamw(cls, d2):
    p1 = torch.nn.Parameter(torch.randn(1024, d2) * 0.1)
    p2 = torch.nn.Parameter(p1.detach().clone())
    ref, opt = torch.optim.AdamW([p1]), cls([p2])  # both default to lr 1e-3, weight_decay 1e-2
    for _ in range(20):
        g = torch.randn(1024, d2) * 0.01
        p1.grad, p2.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
        torch.testing.assert_close(opt.state[p2]["state1"], ref.state[p1]["exp_avg"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(opt.state[p2]["state2"], ref.state[p1]["exp_avg_sq"], atol=1e-6, rtol=1e-5)
        bad = (~torch.isclose(p1.detach(), p2.detach(), atol=1e-6, rtol=1e-5)).sum()
        assert bad <= 15  # bitsandbytes' allowance: decay order and rounding differ from torch's


def test_small_tensors_keep_32bit_states_and_layout_matches_bitsandbytes():
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(4095))
    opt = PagedAdamW8bit([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    sb, ss = opt.state[big], opt.state[small]
    assert sb["step"] == 1 and sb["state1"].dtype == torch.uint8 and sb["state1"].shape == big.shape
    assert sb["absmax1"].shape == (16,) and torch.equal(sb["qmap1"], torch.ops.qlora.dynamic8_code(True))
    assert ss["state1"].dtype == torch.float32 and "absmax1" not in ss
    bytes_8bit = sum(sb[k].numel() * sb[k].element_size() for k in ("state1", "state2", "absmax1", "absmax2"))
    assert bytes_8bit / big.numel() == pytest.approx(2.03125)  # spec §4.9


def test_against_bitsandbytes_cpu_adamw8bit():
    # bitsandbytes' CPU backend (spec §6) dequantizes, updates in float32 and re-quantizes with its LUT quantizer,
    # without the sign fix and decaying first. With wd = 0 the update arithmetic agrees; codes may differ where a value
    # sits within the LUT's bin width (2/65535) of a decision point or where the sign fix applies, and then only to the
    # neighbouring code.
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    w = torch.randn(512, 256) * 0.1
    pa, pb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours, theirs = AdamW8bit([pa], lr=1e-3, weight_decay=0.0), bnb.optim.AdamW8bit([pb], lr=1e-3, weight_decay=0.0)
    # Start from bitsandbytes' first step, so both use its qmaps (generated at run time; they may differ from ours by
    # an ulp in a few entries, spec §2.2).
    pb.grad = torch.randn_like(w) * 0.01
    theirs.step()
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        pa.copy_(pb)
    for _ in range(5):
        g = torch.randn_like(w) * 0.01
        pa.grad, pb.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        sa, sb = ours.state[pa], theirs.state[pb]
        assert torch.equal(sa["qmap1"], sb["qmap1"]) and torch.equal(sa["qmap2"], sb["qmap2"])
        torch.testing.assert_close(sa["absmax1"], sb["absmax1"], atol=0, rtol=1e-6)
        torch.testing.assert_close(sa["absmax2"], sb["absmax2"], atol=0, rtol=1e-6)
        for key, qmap in (("state1", sa["qmap1"]), ("state2", sa["qmap2"])):
            a, b = sa[key].long(), sb[key].long()
            diff = (a - b).abs()
            # Neighbouring codes, or codes closer than one bin of bitsandbytes' LUT (near zero the map's spacing is
            # ~1e-6, far below the bin width, so the LUT cannot pick the nearest code there).
            explained = (diff <= 1) | ((qmap[a] - qmap[b]).abs() <= 2 / 65535)
            assert explained.all(), f"{key}: codes {a[~explained][:5]} vs {b[~explained][:5]}"
            assert (diff > 0).float().mean() < 0.01, f"{key}: {(diff > 0).float().mean():.4f} of codes differ"
        # Parameters within what one code step of the moments can change in an update (lr-relative).
        torch.testing.assert_close(pa.detach(), pb.detach(), atol=1e-4, rtol=0)
        # Continue both from our states so differences do not compound.
        with torch.no_grad():
            pb.copy_(pa)
            for key in ("state1", "state2", "absmax1", "absmax2"):
                sb[key].copy_(sa[key])


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(96, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.Linear(64, 3, bias=False)
    )


def _train(model, opt, steps, gen):
    for _ in range(steps):
        x = torch.randn(32, 96, generator=gen)
        loss = model(x).pow(2).mean() + (model(x)[:, 0] - x[:, 0]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit, AdamW32bit, PagedAdamW])
def test_resume_through_safetensors_is_bit_identical(cls, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    kw = dict(page_min_size=1) if cls in (PagedAdamW8bit, PagedAdamW) else {}
    straight = _model()
    _train(straight, cls(straight.parameters(), lr=3e-3, **kw), 20, _gen())

    gen = _gen()
    first_half = _model()
    opt = cls(first_half.parameters(), lr=3e-3, **kw)
    _train(first_half, opt, 10, gen)
    tensors, meta = state_dict_to_tensors(opt.state_dict())
    path = os.path.join(tmp_path, "optimizer.safetensors")
    safetensors.save_file(tensors, path, metadata={"optimizer": meta})
    weights = {k: v.clone() for k, v in first_half.state_dict().items()}
    del opt, first_half

    resumed = _model(seed=99)
    resumed.load_state_dict(weights)
    opt = cls(resumed.parameters(), lr=1.0, **kw)  # the learning rate comes back from the checkpoint
    with safetensors.safe_open(path, "pt") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()["optimizer"]
    opt.load_state_dict(state_dict_from_tensors(loaded, meta))
    assert opt.param_groups[0]["lr"] == 3e-3
    _train(resumed, opt, 10, gen)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_paged_and_plain_states_load_into_each_other():
    model_a = _model()
    paged = PagedAdamW8bit(model_a.parameters(), page_min_size=1)
    _train(model_a, paged, 5, _gen())
    model_b = copy.deepcopy(model_a)
    plain = AdamW8bit(model_b.parameters())
    plain.load_state_dict(paged.state_dict())
    back = PagedAdamW8bit(model_b.parameters(), page_min_size=1)
    back.load_state_dict(plain.state_dict())
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        for key, value in paged.state[p_a].items():
            other = back.state[p_b][key]
            assert (value == other) if key == "step" else torch.equal(value, other)
    _train(model_a, paged, 5, _gen(4))
    _train(model_b, back, 5, _gen(4))
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p_a, p_b)


def test_loads_bitsandbytes_wrapped_state_and_rejects_mismatches():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.nn.Parameter(torch.randn(128, 64))
    theirs = bnb.optim.AdamW8bit([w])
    w.grad = torch.randn_like(w)
    theirs.step()
    sd = theirs.state_dict()
    assert "__bnb_optimizer_quant_state__" in sd["state"][0]
    ours = AdamW8bit([w])
    ours.load_state_dict(sd)
    assert ours.state[w]["step"] == 1 and torch.equal(ours.state[w]["state1"], theirs.state[w]["state1"])
    with pytest.raises(KeyError, match="parameter 0 of param group 0 has no 'absmax1'.*8-bit"):
        u8 = dict(dtype=torch.uint8)
        f32_state = {"step": 1, "state1": torch.zeros(128, 64, **u8), "state2": torch.zeros(128, 64, **u8)}
        AdamW8bit([w]).load_state_dict(AdamW32bit([w]).state_dict() | {"state": {0: f32_state}})
    with pytest.raises(ValueError, match="'state1' is torch.uint8 with 8192 elements, expected torch.float32"):
        AdamW32bit([w]).load_state_dict(sd)


def test_errors():
    with pytest.raises(ValueError, match=r"AdamW8bit: betas must be two values in \[0, 1\)"):
        AdamW8bit([torch.nn.Parameter(torch.randn(3))], betas=(0.9, 1.0))
    p = torch.nn.Parameter(torch.randn(8, 8))
    p.grad_dtype = None  # torch itself refuses a mismatched gradient unless told otherwise
    p.grad = torch.randn(8, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="parameter 0 of param group 0 is torch.float32 but its gradient is"):
        AdamW8bit([p]).step()


def test_lora_finetune_reaches_fp32_adamw_loss():
    # A small QLoRA fine-tune: an NF4 base layer with a rank-8 adapter learns a rank-4 change of its own output. Both
    # optimizers must cut the loss at least 100x, and the 8-bit one must end within 0.1 % of the starting loss of
    # where torch's float32 AdamW ends (both end near zero, so a ratio of the two final losses would measure noise).
    def build():
        torch.manual_seed(0)
        return qlora.nn.replace_linear_with_qlora(
            torch.nn.Sequential(torch.nn.Linear(128, 128)), target_modules=("0",), r=8, lora_alpha=16
        )

    torch.manual_seed(5)
    x = torch.randn(512, 128)
    with torch.no_grad():
        delta = (torch.randn(128, 4) @ torch.randn(4, 128)) * 0.05
        y = build()(x) + x @ delta.T

    def run(make_opt):
        model = build()
        opt = make_opt([p for p in model.parameters() if p.requires_grad])
        with torch.no_grad():
            first = (model(x) - y).pow(2).mean().item()
        for step in range(300):
            idx = torch.arange(step * 64, step * 64 + 64) % 512
            loss = (model(x[idx]) - y[idx]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return first, (model(x) - y).pow(2).mean().item()

    f32_first, f32 = run(lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    q_first, q8 = run(lambda ps: PagedAdamW8bit(ps, lr=3e-3, min_8bit_size=1024))
    assert f32 < f32_first / 100 and q8 < q_first / 100, (f32_first, f32, q_first, q8)
    assert abs(q8 - f32) < 1e-3 * f32_first, (f32_first, f32, q8)
