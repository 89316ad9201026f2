"""qlora.nn: Linear4bit, LoraLinear4bit and replace_linear_with_qlora, on their own and on a transformers Llama."""

import math

import pytest
import torch
from torch import nn

import qlora
from qlora.nn import Linear4bit, LoraLinear4bit, replace_linear_with_qlora, trainable_parameters_report


def test_linear4bit_matches_functional_and_keeps_state_in_buffers():
    dense = nn.Linear(96, 40)
    layer = Linear4bit.from_linear(dense)
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), qlora.functional.linear(x, layer.weight, dense.bias.detach()), rtol=0, atol=0)
    assert {"packed", "absmax", "nested_absmax", "nested_code", "offset", "bias"} <= set(layer.state_dict())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    # The quantized weight is within the format's step of the dense one: half the widest gap between NF4 codes times
    # the block absmax, plus the double-quantized absmax's error (at most 1 - 0.99296874 of the nested absmax).
    code = torch.ops.qlora.nf4_code()
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    err = (layer.weight.dequantize() - dense.weight.detach()).abs()
    assert err.max() <= (half_gap + (1 - 0.99296874)) * dense.weight.detach().abs().max() * 1.0001


def test_lora_layer_starts_at_the_base_output_and_trains_only_lora():
    dense = nn.Linear(64, 32)
    layer = LoraLinear4bit.from_linear(dense, r=4, lora_alpha=8)
    base = Linear4bit.from_linear(dense)
    x = torch.randn(5, 64, requires_grad=True)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # lora_B starts at zero (PEFT init)
    assert layer.scaling == 2.0
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["lora_A", "lora_B"]
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(x)
    ref = base(x) + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is not None


def test_rslora_scaling_and_dropout_only_in_training():
    dense = nn.Linear(64, 16)
    layer = LoraLinear4bit.from_linear(dense, r=16, lora_alpha=8, lora_dropout=0.5, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / math.sqrt(16))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 64)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert not torch.equal(y1, y2), "dropout must act on the LoRA branch in training"
    base = Linear4bit(layer.weight, dense.bias)(x)
    # The base path is untouched by dropout: y - base is the LoRA term of a masked, rescaled input.
    torch.manual_seed(0)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y1 - base, layer.scaling * (mask_x @ layer.lora_A.T) @ layer.lora_B.T, rtol=1e-4, atol=1e-5)


def test_replace_on_a_transformers_llama_trains():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (2, 24))
    replace_linear_with_qlora(model, r=8, lora_alpha=16)
    n_lora = sum(isinstance(m, LoraLinear4bit) for m in model.modules())
    assert n_lora == 2 * 7
    report = trainable_parameters_report(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.startswith(f"trainable params: {trainable:,d} ||")
    # r * (in + out) per projection: q, o (64+64), k, v (64+32), gate, up (64+160), down (160+64); two layers.
    assert trainable == 2 * 8 * (2 * 128 + 2 * 96 + 3 * 224)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.05, losses


def test_replace_rejects_models_without_targets():
    with pytest.raises(ValueError, match="no nn.Linear named any of"):
        replace_linear_with_qlora(nn.Sequential(nn.Linear(4, 4)), target_modules=["q_proj"])
