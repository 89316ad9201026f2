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


def test_llama_training_matches_peft_over_bitsandbytes():
    """The same tiny Llama, fine-tuned for a few AdamW steps two ways on identical NF4 bytes and LoRA init: (a) PEFT
    LoRA over bitsandbytes Linear4bit, (b) qlora.nn layers. The loss curves agree to float32 noise: both compute the
    same math with sums in different orders (~1e-6 relative per op), which AdamW's normalised steps keep from
    growing beyond ~1e-4 relative over a few steps."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    import copy

    # Sizes are multiples of 64 so no quantization block straddles a row (see TestPeers in test_linear.py).
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref_model = copy.deepcopy(base)
    ours = copy.deepcopy(base)

    # (a) bitsandbytes Linear4bit + PEFT
    for parent in list(ref_model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                lin = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                        compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
                lin.weight = bnb.nn.Params4bit(data=child.weight.detach().clone(), requires_grad=False,
                                               quant_type="nf4", compress_statistics=True, blocksize=64)
                setattr(parent, name, lin.to("cpu"))
    ref_model = peft.get_peft_model(ref_model, peft.LoraConfig(target_modules=targets, r=8, lora_alpha=16))

    # (b) qlora layers on the same bytes and the same LoRA initialisation
    replace_linear_with_qlora(ours, targets, r=8, lora_alpha=16)
    ref_layers = dict(ref_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, mod in ours.named_modules():
            if isinstance(mod, LoraLinear4bit):
                peft_layer = ref_layers[name]
                q = qlora.NF4Tensor.from_bnb_state_dict(peft_layer.base_layer.state_dict(), "weight")
                for field in ("packed", "absmax", "nested_absmax", "nested_code", "offset"):
                    getattr(mod, field).copy_(getattr(q, field))
                mod.lora_A.copy_(peft_layer.lora_A["default"].weight)
                mod.lora_B.copy_(peft_layer.lora_B["default"].weight)
                peft_layer.lora_B["default"].weight.normal_(0, 0.02)  # start away from B = 0 so A gets gradients
                mod.lora_B.copy_(peft_layer.lora_B["default"].weight)

    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    curves = []
    for model in (ref_model, ours):
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == 2 * 2 * 7
        opt = torch.optim.AdamW(params, lr=1e-3)
        losses = []
        for _ in range(5):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    ref_losses, our_losses = curves
    assert our_losses[-1] < our_losses[0]
    for a, b in zip(ref_losses, our_losses):
        assert abs(a - b) <= 1e-4 * abs(a), (ref_losses, our_losses)
