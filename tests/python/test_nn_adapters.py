"""Adapter hot-swap in qlora.nn (named adapters of LoraLinear4bit; load_peft_adapter, save_peft_adapter and
set_active_adapter over a model, in PEFT's directory format) and qlora.safetensors_io, checked against
transformers + PEFT and the safetensors package.

Bounds: a swap runs the very same operator calls on the very same tensors, so swapped results are compared bit for
bit (torch.equal). Against PEFT the math is the same (the PEFT model runs on the dequantized NF4 weights, float32)
but the sums run in another order (qlora's kernel vs torch's matmul), ~1e-6 relative per op through two layers:
the logits must agree within 1e-5 of their scale, as in test_safetensors_interop.py.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import warnings

import pytest
import torch
from torch import nn

from qlora import safetensors_io
from qlora.nn import (
    Linear4bit,
    LoraLinear4bit,
    load_peft_adapter,
    replace_linear_with_qlora,
    save_peft_adapter,
    set_active_adapter,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LORA = 2 * len(TARGETS)  # two decoder layers


# ---------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def base():
    """The tiny float32 transformers Llama every test converts (eager attention, fixed seed, nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def converted(base, **lora):
    """A copy of ``base`` with the seven projections as NF4 + LoRA (r 4, lora_alpha 8 unless given)."""
    kw = {"r": 4, "lora_alpha": 8}
    kw.update(lora)
    return replace_linear_with_qlora(copy.deepcopy(base), TARGETS, **kw).eval()


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_pair(layer, r, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, layer.in_features, generator=g) / math.sqrt(layer.in_features)
    b = torch.randn(layer.out_features, r, generator=g) * 0.1
    return a, b


def add_random_adapter(model, name, r, scaling, seed):
    for i, (_, layer) in enumerate(lora_layers(model)):
        layer.add_adapter(name, *random_pair(layer, r, seed + i), scaling)


def without_lora(model):
    """A copy of a converted model whose LoRA layers are plain Linear4bit on the same NF4 tensors."""
    plain = copy.deepcopy(model)
    for name, layer in lora_layers(plain):
        parent, attr = plain.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        setattr(parent, attr, Linear4bit(layer.weight, layer.bias))
    return plain


def dense_on_nf4(base, model):
    """A copy of the transformers ``base`` whose target weights are ``model``'s NF4 weights, dequantized."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            ref.get_submodule(name).weight.copy_(layer.weight.dequantize(torch.float32))
    return ref


def assert_close_to(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Hot-swap on a layer and on a model


def test_hot_swap_is_bit_exact_and_none_is_the_bare_nf4_model(base):
    model = converted(base)
    plain_logits = logits(without_lora(model))
    assert all(torch.count_nonzero(layer.lora_B) == 0 for _, layer in lora_layers(model))  # PEFT init: B = 0
    assert torch.equal(logits(model), plain_logits)  # so the default adapter adds exact zeros
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0.0, 0.1)  # from here on every adapter changes the output
    ld = logits(model)
    add_random_adapter(model, "A", r=4, scaling=2.0, seed=10)
    add_random_adapter(model, "B", r=8, scaling=0.5, seed=50)  # another rank: adapters need not share r
    storage = [(layer.packed.data_ptr(), layer.absmax.data_ptr()) for _, layer in lora_layers(model)]

    set_active_adapter(model, "A")
    la = logits(model)
    set_active_adapter(model, "B")
    lb = logits(model)
    set_active_adapter(model, "A")
    assert torch.equal(logits(model), la)
    for one, other in ((la, lb), (la, ld), (lb, ld), (la, plain_logits), (lb, plain_logits), (ld, plain_logits)):
        assert (one - other).abs().max() > 0.01 * plain_logits.abs().max(), "every adapter must change the logits"
    set_active_adapter(model, None)
    assert torch.equal(logits(model), plain_logits)
    set_active_adapter(model, "default")
    assert torch.equal(logits(model), ld)
    set_active_adapter(model, "none")
    assert torch.equal(logits(model), plain_logits)
    assert all(layer.active_adapter is None for _, layer in lora_layers(model))
    # The NF4 weight was neither copied nor re-quantized by any add or switch.
    assert [(layer.packed.data_ptr(), layer.absmax.data_ptr()) for _, layer in lora_layers(model)] == storage

    # Adapter A active gives what a model built with A as its own adapter gives: the same calls on the same tensors.
    same = converted(base)
    with torch.no_grad():
        for (_, layer), (_, own) in zip(lora_layers(model), lora_layers(same)):
            own.lora_A.copy_(layer.get_adapter("A").lora_A)
            own.lora_B.copy_(layer.get_adapter("A").lora_B)
            own.scaling = 2.0
    assert torch.equal(logits(same), la)


def test_add_adapter_copies_lora_tensors_and_nothing_else():
    layer = LoraLinear4bit.from_linear(nn.Linear(64, 32), r=4, lora_alpha=8)
    buffers = {n: (b.data_ptr(), b.numel() * b.element_size()) for n, b in layer.named_buffers()}
    params = sum(p.numel() for p in layer.parameters())
    a, b = random_pair(layer, 6, seed=0)
    layer.add_adapter("A", a, b, 1.5)
    assert {n: (b.data_ptr(), b.numel() * b.element_size()) for n, b in layer.named_buffers()} == buffers
    assert sum(p.numel() for p in layer.parameters()) == params + 6 * (64 + 32)
    assert "lora_adapters.A.lora_A" in layer.state_dict() and "lora_adapters.A.lora_B" in layer.state_dict()
    stored = layer.get_adapter("A")
    assert torch.equal(stored.lora_A, a) and stored.lora_A.data_ptr() != a.data_ptr()
    assert (stored.r, stored.scaling, stored.lora_alpha, stored.use_rslora) == (6, 1.5, 9.0, False)
    assert not stored.lora_A.requires_grad and not stored.lora_B.requires_grad  # added adapters start frozen
    x = torch.randn(3, 64)
    layer.set_adapter("A")
    want = Linear4bit(layer.weight, layer.bias)(x) + 1.5 * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)  # float32, summation order only
    with torch.no_grad():
        a.zero_()  # the caller's tensor is not the layer's
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert "active_adapter='A'" in repr(layer)


def test_an_unfrozen_added_adapter_trains_like_the_default_one():
    dense = nn.Linear(64, 32)
    layer = LoraLinear4bit.from_linear(dense, r=4, lora_alpha=8)
    twin = LoraLinear4bit.from_linear(dense, r=4, lora_alpha=8)  # same NF4 bytes
    a, b = random_pair(layer, 4, seed=3)
    layer.add_adapter("A", a, b, 2.0)
    layer.set_adapter("A")
    for p in layer.lora_adapters["A"].parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        twin.lora_A.copy_(a)
        twin.lora_B.copy_(b)
    x = torch.randn(5, 64)
    layer(x).square().sum().backward()
    twin(x).square().sum().backward()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None  # the inactive default gets nothing
    assert torch.equal(layer.lora_adapters["A"].lora_A.grad, twin.lora_A.grad)
    assert torch.equal(layer.lora_adapters["A"].lora_B.grad, twin.lora_B.grad)
    assert twin.lora_A.grad.abs().max() > 0


def test_layer_adapter_errors():
    layer = LoraLinear4bit.from_linear(nn.Linear(64, 32), r=4, lora_alpha=8)
    a, b = random_pair(layer, 4, seed=0)
    layer.add_adapter("A", a, b, 2.0)
    cases = [
        (lambda: layer.set_adapter("C"), r"no adapter named 'C'; known: \['default', 'A'\] \(or None to disable"),
        (lambda: layer.add_adapter("A", a, b, 2.0), r"an adapter named 'A' exists already"),
        (lambda: layer.add_adapter("default", a, b, 2.0), r"adapter name 'default' is not allowed"),
        (lambda: layer.add_adapter("none", a, b, 2.0), r"adapter name 'none' is not allowed"),
        (lambda: layer.add_adapter("x.y", a, b, 2.0), r"adapter name 'x.y' is not allowed"),
        (lambda: layer.add_adapter("keys", a, b, 2.0), r"adapter name 'keys' is not allowed \(an nn.ModuleDict"),
        (lambda: layer.add_adapter("C", a[:, :63], b, 2.0),
         r"add_adapter\('C'\): lora_A must be \[r, 64\] with r > 0, got \[4, 63\]"),
        (lambda: layer.add_adapter("C", a, b[:, :3], 2.0),
         r"lora_B must be \[32, 4\] \(r from lora_A\), got \[32, 3\]"),
        (lambda: layer.add_adapter("C", a.long(), b, 2.0),
         r"lora_A must be a 2-D floating-point tensor, got torch.int64 \[4, 64\]"),
        (lambda: layer.add_adapter("C", a, b, math.nan), r"scaling must be a finite number"),
        (lambda: layer.delete_adapter("default"), r"'default' is not an added adapter; added: \['A'\]"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            call()
        one_line(e)
    assert layer.adapter_names == ["default", "A"]
    layer.set_adapter("A")
    with pytest.raises(ValueError, match="'A' is active; set_adapter another one first"):
        layer.delete_adapter("A")
    layer.set_adapter(None)
    layer.delete_adapter("A")
    assert layer.adapter_names == ["default"] and "lora_adapters.A.lora_A" not in layer.state_dict()


# ---------------------------------------------------------------------------------------------------------------
# PEFT directories: qlora -> PEFT, PEFT -> qlora, qlora -> qlora


def peft_loads(base, model, adapter_dir):
    """PeftModel.from_pretrained of ``adapter_dir`` over ``base`` with ``model``'s dequantized NF4 weights; checks that
    PEFT warned of no missing or unexpected key and loaded non-zero B everywhere."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(dense_on_nf4(base, model), str(adapter_dir)).eval()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == N_LORA and all(p.abs().max() > 0 for p in lora_b)
    return peft_model


@pytest.mark.parametrize("which", ["default_rslora_dropout", "added"])
def test_saved_adapter_loads_in_peft_with_the_same_logits(base, tmp_path, which):
    if which == "added":
        model = converted(base)
        add_random_adapter(model, "A", r=6, scaling=1.5, seed=7)
        set_active_adapter(model, "A")
        name, r, alpha, rslora, dropout = "A", 6, 9, False, 0.0
    else:
        model = converted(base, use_rslora=True, lora_dropout=0.1)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.normal_(0.0, 0.1)
        name, r, alpha, rslora, dropout = "default", 4, 8, True, 0.1
    ours = logits(model)  # eval(): no dropout
    out = tmp_path / "adapter"
    save_peft_adapter(model, str(out), name=name, base_model_name_or_path="tiny-llama")

    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temporary left
    cfg = json.loads((out / "adapter_config.json").read_text())
    expected = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                "target_modules": sorted(TARGETS), "use_rslora": rslora, "bias": "none", "fan_in_fan_out": False,
                "base_model_name_or_path": "tiny-llama", "inference_mode": True, "use_dora": False}
    assert {k: cfg.get(k) for k in expected} == expected
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
    assert keys == {f"base_model.model.{n}.lora_{p}.weight" for n, _ in lora_layers(model) for p in "AB"}

    assert_close_to(ours, logits(peft_loads(base, model, out)))


def peft_adapter(base, model, directory, **lora):
    """A PEFT LoRA on the seven projections of ``base`` over ``model``'s dequantized NF4 weights, with random B,
    saved by PEFT to ``directory``; returns the PEFT model."""
    peft = pytest.importorskip("peft")
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "lora_dropout": 0.0}
    cfg.update(lora)
    peft_model = peft.get_peft_model(dense_on_nf4(base, model), peft.LoraConfig(**cfg))
    with torch.no_grad():
        for i, (n, p) in enumerate(peft_model.named_parameters()):
            if "lora_B" in n:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(i))
    peft_model.save_pretrained(str(directory))
    return peft_model.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_written_by_peft_loads_with_peft_logits(base, tmp_path, use_rslora):
    model = converted(base, r=8, lora_alpha=16)  # the layers' own adapter has another rank
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0.0, 0.1)
    own = logits(model)
    want = logits(peft_adapter(base, model, tmp_path / "peft", use_rslora=use_rslora))

    assert load_peft_adapter(model, "peft", str(tmp_path / "peft")) is model
    assert torch.equal(logits(model), own)  # loading does not switch
    scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    assert all(layer.get_adapter("peft").scaling == scale for _, layer in lora_layers(model))
    set_active_adapter(model, "peft")
    assert_close_to(logits(model), want)
    set_active_adapter(model, "default")
    assert torch.equal(logits(model), own)


def test_loading_into_default_replaces_the_trainable_adapter(base, tmp_path):
    model = converted(base, r=4, lora_alpha=32)
    want = logits(peft_adapter(base, model, tmp_path / "peft"))  # r 4, lora_alpha 8
    load_peft_adapter(model, "default", str(tmp_path / "peft"))
    assert all(layer.adapter_names == ["default"] and layer.scaling == 2.0 for _, layer in lora_layers(model))
    assert all(layer.lora_A.requires_grad for _, layer in lora_layers(model))
    assert_close_to(logits(model), want)
    wider = converted(base, r=8)
    with pytest.raises(ValueError, match=r"adapter_config.json: r is 4 but the default adapter of "
                                         r"model.layers.0.self_attn.q_proj has r 8; load the adapter under another"):
        load_peft_adapter(wider, "default", str(tmp_path / "peft"))


def test_save_then_load_gives_the_same_logits_bit_for_bit(base, tmp_path):
    model = converted(base, use_rslora=True)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0.0, 0.1)
    trained = logits(model)
    save_peft_adapter(model, str(tmp_path / "a"))
    fresh = converted(base)  # quantization is deterministic: the same NF4 bytes
    load_peft_adapter(fresh, "trained", str(tmp_path / "a"))
    set_active_adapter(fresh, "trained")
    assert torch.equal(logits(fresh), trained)  # float32 tensors stored exactly, the same scale, the same calls


# ---------------------------------------------------------------------------------------------------------------
# Bad adapters


def _edit_tensors(fn):
    def mutate(d):
        path = d / "adapter_model.safetensors"
        tensors = safetensors_io.load_file(path)
        fn(tensors)
        safetensors_io.save_file(tensors, path, metadata={"format": "pt"})
    return mutate


def _edit_config(**changes):
    def mutate(d):
        path = d / "adapter_config.json"
        cfg = json.loads(path.read_text())
        cfg.update(changes)
        path.write_text(json.dumps(cfg))
    return mutate


def _set(key, value):
    def fn(tensors):
        tensors[key] = value
    return fn


def _truncate(d):
    path = d / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])


def _pickle_only(d):
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")  # never read: the name is enough


_L = "base_model.model.model.layers"
BAD_ADAPTERS = {
    "wrong shape": (_edit_tensors(_set(f"{_L}.1.self_attn.v_proj.lora_B.weight", torch.zeros(32, 5))),
                    (rf"adapter_model.safetensors: {_L}.1.self_attn.v_proj.lora_B.weight has shape \[32, 5\] but "
                     r"module model.layers.1.self_attn.v_proj expects \[32, 4\] \(r 4 from adapter_config.json\)$")),
    "missing tensor": (_edit_tensors(lambda t: t.pop(f"{_L}.0.mlp.down_proj.lora_A.weight")),
                       (rf"adapter_model.safetensors: no tensor {_L}.0.mlp.down_proj.lora_A.weight for the LoRA layer "
                        r"model.layers.0.mlp.down_proj$")),
    "extra tensor": (_edit_tensors(_set("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 64))),
                     (r"adapter_model.safetensors: base_model.model.lm_head.lora_A.weight matches no LoRA layer of the "
                      r"model$")),
    "integer tensor": (_edit_tensors(_set(f"{_L}.0.self_attn.q_proj.lora_A.weight",
                                          torch.zeros(4, 64, dtype=torch.int32))),
                       r"q_proj.lora_A.weight has dtype torch.int32, expected float32, bfloat16 or float16$"),
    "truncated file": (_truncate, (r"adapter_model.safetensors: the file is truncated: the tensors cover \d+ bytes of "
                                   r"data, the file holds \d+$")),
    "pickle only": (_pickle_only, (r"adapter_model.safetensors: no such file; .*adapter_model.bin is a pickle, which "
                                   r"qlora never reads")),
    "use_dora": (_edit_config(use_dora=True), r"adapter_config.json: key 'use_dora' is true, which qlora does not"),
    "lora_bias": (_edit_config(lora_bias=True), r"key 'lora_bias' is true, which qlora does not support"),
    "fan_in_fan_out": (_edit_config(fan_in_fan_out=True), r"key 'fan_in_fan_out' is true, which qlora does not"),
    "bias": (_edit_config(bias="all"), (r"adapter_config.json: key 'bias' must be \"none\" \(qlora trains no "
                                        r"biases\), got \"all\"$")),
    "rank_pattern": (_edit_config(rank_pattern={"q_proj": 8}),
                     r"key 'rank_pattern' is not empty \(\{\"q_proj\": 8\}\)"),
    "alpha_pattern": (_edit_config(alpha_pattern={"v_proj": 2}), r"key 'alpha_pattern' is not empty"),
    "modules_to_save": (_edit_config(modules_to_save=["lm_head"]), r"key 'modules_to_save' is set \(\[\"lm_head\"\]\)"),
    "peft_type": (_edit_config(peft_type="IA3"), r"adapter_config.json: key 'peft_type' must be \"LORA\", got \"IA3\""),
    "r zero": (_edit_config(r=0), r"key 'r' must be a positive integer, got 0$"),
    "r string": (_edit_config(r="4"), r"key 'r' must be a positive integer, got \"4\"$"),
    "lora_alpha": (_edit_config(lora_alpha=None), r"key 'lora_alpha' must be a number, got null$"),
    "use_rslora": (_edit_config(use_rslora="yes"), r"key 'use_rslora' must be true or false, got \"yes\"$"),
    "not json": (lambda d: (d / "adapter_config.json").write_text("{'r': 4}"), r"adapter_config.json: not UTF-8 JSON"),
    "no config": (lambda d: (d / "adapter_config.json").unlink(),
                  r"adapter_config.json: no such file \(a PEFT adapter directory holds"),
}


@pytest.fixture(scope="module")
def peft_dir(base, tmp_path_factory):
    directory = tmp_path_factory.mktemp("peft") / "adapter"
    peft_adapter(base, converted(base), directory)
    return directory


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapters_are_refused_with_one_line_naming_the_file(base, peft_dir, tmp_path, case):
    mutate, message = BAD_ADAPTERS[case]
    directory = tmp_path / "adapter"
    shutil.copytree(peft_dir, directory)
    mutate(directory)
    model = converted(base)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
        load_peft_adapter(model, "x", str(directory))
    assert one_line(e).startswith(str(directory) + os.sep)
    assert all(layer.adapter_names == ["default"] for _, layer in lora_layers(model))  # nothing half-loaded


def test_model_level_errors(base, peft_dir, tmp_path):
    model = converted(base)
    with pytest.raises(ValueError, match=r"set_active_adapter: LoRA layer model.layers.0.self_attn.q_proj has no "
                                         r"adapter named 'nope'; it has \['default'\] \(or None to disable LoRA\)$"):
        set_active_adapter(model, "nope")
    first = lora_layers(model)[0][1]
    first.add_adapter("only_here", *random_pair(first, 4, seed=0), 1.0)
    with pytest.raises(ValueError, match=r"layer model.layers.0.self_attn.k_proj has no adapter named 'only_here'"):
        set_active_adapter(model, "only_here")
    assert first.active_adapter == "default"  # checked everywhere before switching anything
    with pytest.raises(ValueError, match=r"save_peft_adapter: LoRA layer model.layers.0.self_attn.k_proj has no "
                                         r"adapter named 'only_here'"):
        save_peft_adapter(model, str(tmp_path / "s"), name="only_here")

    for i, (_, layer) in enumerate(lora_layers(model)):
        layer.add_adapter("mixed", *random_pair(layer, 2 if i == 3 else 4, seed=i), 1.0)
    with pytest.raises(ValueError, match=r"save_peft_adapter: adapter 'mixed' of model.layers.0.self_attn.o_proj has "
                                         r"\{'r': 2, .* but model.layers.0.self_attn.q_proj has \{'r': 4, .*a PEFT "
                                         r"adapter has one r, lora_alpha"):
        save_peft_adapter(model, str(tmp_path / "s"), name="mixed")
    assert not (tmp_path / "s").exists()

    load_peft_adapter(model, "p", str(peft_dir))
    with pytest.raises(ValueError, match=r"load_peft_adapter: model.layers.0.self_attn.q_proj: LoraLinear4bit: an "
                                         r"adapter named 'p' exists already"):
        load_peft_adapter(model, "p", str(peft_dir))
    for call in (lambda: set_active_adapter(nn.Linear(2, 2), None),
                 lambda: load_peft_adapter(nn.Sequential(), "p", str(peft_dir)),
                 lambda: save_peft_adapter(nn.Linear(2, 2), str(tmp_path / "s"))):
        with pytest.raises(ValueError, match=r"the model has no LoraLinear4bit layers \(convert it with "
                                             r"replace_linear_with_qlora\)"):
            call()


# ---------------------------------------------------------------------------------------------------------------
# qlora.safetensors_io against the safetensors package


def _every_dtype():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 3, generator=g).half(),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "i64": torch.randint(-(2**40), 2**40, (3,), generator=g),
        "i32": torch.randint(-1000, 1000, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.tensor([-3, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.arange(0, 250, 7, dtype=torch.uint8),
        "u16": torch.tensor([1, 65535]).to(torch.uint16),
        "u32": torch.tensor([1, 2**32 - 1]).to(torch.uint32),
        "u64": torch.tensor([1, 2**62]).to(torch.uint64),
        "bool": torch.tensor([True, False, True]),
        "f8_e4m3": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(5, generator=g).to(torch.float8_e5m2),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "odd": torch.arange(3, dtype=torch.uint8),  # leaves the next tensors unaligned in a file sorted by name
    }


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def test_files_written_by_the_safetensors_package_read_back_exactly(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = _every_dtype()
    path = tmp_path / "ref.safetensors"
    st.save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    got, meta = safetensors_io.read_file(path)
    _same(got, tensors)
    assert meta == {"format": "pt", "note": "x"}
    assert all(t.data_ptr() % 64 == 0 for t in got.values() if t.numel())  # each in its own allocation


def test_files_written_here_are_the_safetensors_package_files(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    safetensors = pytest.importorskip("safetensors")
    tensors = _every_dtype()
    tensors["strided"] = torch.arange(24.0).reshape(4, 6)[:, ::2]  # written contiguous
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    safetensors_io.save_file(tensors, ours, metadata={"format": "pt"})
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(ref), metadata={"format": "pt"})
    assert ours.read_bytes() == ref.read_bytes()  # same layout, order, padding and JSON
    _same(st.load_file(str(ours)), tensors)
    with safetensors.safe_open(str(ours), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    safetensors_io.save_file({"a": torch.ones(2)}, ours)  # overwrite, no metadata
    _same(st.load_file(str(ours)), {"a": torch.ones(2)})


def _raw(header, data: bytes = bytes(40)) -> bytes:
    """A file with ``header`` (an object, or raw bytes) and data buffer ``data``."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _valid(**changes):
    """Header of a valid file (a: F32 [2, 3] at 0..24, b: I64 [2] at 24..40), with entries of ``a`` changed."""
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}}
    header["a"].update(changes)
    return header


_DUPLICATE = (b'{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},'
              b'"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}')
# name: (file bytes, our message, whether the safetensors package rejects it too)
BAD_FILES = {
    "shorter than 8 bytes": (b"\x01\x02", r"the file is 2 bytes, shorter than the 8-byte header length", True),
    "header length over the cap": ((2**40).to_bytes(8, "little") + b"{}", (r"header length 1099511627776 exceeds the "
                                                                           r"limit of 100000000 bytes"), True),
    "header past the end": ((100).to_bytes(8, "little") + b"{}", (r"header length 100 runs past the end of the "
                                                                  r"10-byte file"), True),
    "not UTF-8": (_raw(b'{"\xff":1}'), r"the header is not UTF-8", True),
    "not JSON": (_raw(b'{"a":'), r"the header is not JSON", True),
    "not an object": (_raw(b"[1, 2]"), r"the header must be a JSON object, got list", True),
    "unknown dtype": (_raw(_valid(dtype="Q4")), r"tensor 'a' has dtype \"Q4\", expected one of \['BOOL'", True),
    "sub-byte dtype": (_raw(_valid(dtype="F4")), r"tensor 'a' has dtype \"F4\"", True),
    "negative dimension": (_raw(_valid(shape=[-2, 3])), (r"tensor 'a' has shape \[-2, 3\], expected a list of "
                                                         r"non-negative integers"), True),
    "float dimension": (_raw(_valid(shape=[2.0, 3])), r"tensor 'a' has shape \[2.0, 3\]", True),
    "boolean dimension": (_raw(_valid(shape=[True, 3])), r"tensor 'a' has shape \[true, 3\]", True),
    "reversed offsets": (_raw(_valid(data_offsets=[24, 0])), (r"tensor 'a' has data_offsets \[24, 0\], expected "
                                                              r"\[begin, end\] with 0 <= begin <= end"), True),
    "size mismatch": (_raw(_valid(shape=[2, 2])), (r"tensor 'a' \(F32 \[2, 2\]\) needs 16 bytes but its data_offsets "
                                                   r"\[0, 24\] span 24"), True),
    "overlap": (_raw({"a": _valid()["a"], "b": {"dtype": "I64", "shape": [2], "data_offsets": [16, 32]}}, bytes(32)),
                r"tensors 'a' and 'b' overlap in the data buffer \(bytes 16..24\)", True),
    "gap": (_raw({"a": _valid()["a"], "b": {"dtype": "I64", "shape": [2], "data_offsets": [32, 48]}}, bytes(48)),
            r"bytes 24..32 of the data buffer belong to no tensor \(before 'b'\)", True),
    "trailing bytes": (_raw(_valid(), bytes(41)), (r"the file has trailing bytes: the tensors cover 40 bytes of data, "
                                                   r"the file holds 41"), True),
    "truncated": (_raw(_valid(), bytes(36)), (r"the file is truncated: the tensors cover 40 bytes of data, the file "
                                              r"holds 36"), True),
    "metadata not strings": (_raw({"__metadata__": {"format": 1}, **_valid()}),
                             r"'__metadata__' must map strings to strings, got \{\"format\": 1\}", True),
    "entry not an object": (_raw({"a": [1, 2]}), r"tensor 'a' must be an object with dtype, shape and data_offsets",
                            True),
    # Stricter than the reference (which keeps the last duplicate and ignores unknown fields), as the C++ reader is:
    "duplicate name": (_raw(_DUPLICATE, bytes(24)), r"the header names 'a' twice", False),
    "unknown field": (_raw(_valid(extra=1)), (r"tensor 'a' must have exactly dtype, shape and data_offsets \(missing "
                                              r"\[\], unknown \['extra'\]\)"), False),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_files_are_refused_with_one_line(tmp_path, case):
    st = pytest.importorskip("safetensors.torch")
    data, message, reference_rejects = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="^" + re.escape(str(path)) + ": " + message) as e:
        safetensors_io.load_file(path)
    one_line(e)
    if reference_rejects:
        with pytest.raises(Exception):  # noqa: B017  (the package's own error types)
            st.load_file(str(path))
    else:
        st.load_file(str(path))  # documents where this reader is stricter than the reference


def test_valid_variants_the_reference_accepts_are_accepted(tmp_path):
    path = tmp_path / "ok.safetensors"
    ones = torch.ones(2, 3)
    data = bytes(ones.reshape(-1).view(torch.uint8).tolist()) + bytes(16)
    path.write_bytes(_raw(b"  " + json.dumps(_valid()).encode() + b"  ", data))
    got, meta = safetensors_io.read_file(path)  # whitespace around the JSON (the reference pads with spaces)
    assert torch.equal(got["a"], ones) and torch.equal(got["b"], torch.zeros(2, dtype=torch.int64)) and meta == {}
    path.write_bytes(_raw({"b": {"dtype": "I64", "shape": [0], "data_offsets": [0, 0]}}, b""))
    assert safetensors_io.load_file(path)["b"].shape == (0,)  # an empty file body is a valid empty tensor


def test_writes_are_atomic_and_bad_input_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    safetensors_io.save_file({"a": torch.ones(3)}, path)
    before = path.read_bytes()
    cases = [
        ({"a": torch.ones(2, dtype=torch.complex128)}, None, (r"tensor 'a' has dtype torch.complex128, which "
                                                              r"safetensors cannot store here")),
        ({"__metadata__": torch.ones(1)}, None, r"tensor name '__metadata__' is not allowed"),
        ({"a": [1.0]}, None, r"'a' is a list, not a torch.Tensor"),
        ({"a": torch.ones(1)}, {"format": 1}, r"metadata must map strings to strings"),
    ]
    for tensors, metadata, message in cases:
        with pytest.raises(ValueError, match="^" + re.escape(str(path)) + ": " + message):
            safetensors_io.save_file(tensors, path, metadata=metadata)

    def failing():
        yield b"partial"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        safetensors_io.write_file_atomically(path, failing())
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["f.safetensors"]  # old file, no temporary
