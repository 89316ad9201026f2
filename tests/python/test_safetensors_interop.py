"""qlora's C++ safetensors reader and writer (trainer/, through build/bin/qlora_safetensors) against the reference
`safetensors` package, in both directions (reliability-tests.md S26, S5, S16): files the reference writes are read
with the same values, files qlora writes are read by the reference with the same values and metadata, and a file the
reference rejects is rejected by qlora with a one-line message naming it."""

import os
import random
import struct
import subprocess

import pytest
import torch

from conftest import LLAMA_CASES, eager_llama

safetensors_torch = pytest.importorskip("safetensors.torch")



def random_tensors(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8,
              torch.uint8, torch.bool]
    out = {}
    for i in range(12):
        dtype = rng.choice(dtypes)
        shape = [rng.choice([0, 1, 2, 3, 7, 64]) for _ in range(rng.randint(0, 3))]
        t = torch.randn(shape, generator=gen) * 10
        out[f"t{i}.{dtype}".replace("torch.", "")] = t.to(dtype) if dtype != torch.bool else t > 0
    return out


@pytest.mark.parametrize("seed", range(6))
def test_reference_file_through_qlora_writer_back_to_reference(tool, tmp_path, seed):
    tensors = random_tensors(seed)
    src, dst = str(tmp_path / "ref.safetensors"), str(tmp_path / "qlora.safetensors")
    safetensors_torch.save_file(tensors, src, metadata={"origin": "reference", "seed": str(seed)})
    subprocess.run([tool, "copy", src, dst], check=True, capture_output=True)
    back = safetensors_torch.load_file(dst)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safetensors_torch.safe_open(dst, "pt") as f:
        assert f.metadata() == {"origin": "reference", "seed": str(seed), "format": "pt"}
    # qlora's writer aligns every tensor and pads the header with spaces only.
    with open(dst, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = fh.read(n)
    assert (8 + n) % 8 == 0 and header.startswith(b"{") and header.rstrip(b" ").endswith(b"}")


def test_check_lists_tensors_of_a_reference_file(tool, tmp_path):
    path = str(tmp_path / "a.safetensors")
    safetensors_torch.save_file({"w": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.zeros(0)}, path)
    out = subprocess.run([tool, "check", path], check=True, capture_output=True, text=True).stdout.split("\n")
    assert "w BF16 [3,4]" in out and "b F32 [0]" in out


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b[:-3], "truncated"),
        (lambda b: b[:8] + b[8:].replace(b'"F32"', b'"F33"', 1), 'unknown dtype "F33"'),
        (lambda b: struct.pack("<Q", 2**63) + b[8:], "exceeds the format's limit"),
    ],
)
def test_files_the_reference_rejects_are_rejected(tool, tmp_path, mutate, message):
    good = str(tmp_path / "good.safetensors")
    safetensors_torch.save_file({"x": torch.ones(5)}, good)
    with open(good, "rb") as fh:
        data = mutate(fh.read())
    bad = str(tmp_path / "bad.safetensors")
    with open(bad, "wb") as fh:
        fh.write(data)
    with pytest.raises(Exception):
        safetensors_torch.load_file(bad)  # the reference rejects it too
    r = subprocess.run([tool, "check", bad], capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith(bad + ": ") and message in lines[0], r.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Llama directories written by transformers (issue 5's model configs): config.json parsed as transformers reads it, and
# the checkpoint's tensor names and shapes match what qlora expects from that config.

@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_transformers_llama_directory(tool, tmp_path, case):
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=200, hidden_size=96, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=128)
    kw.update(LLAMA_CASES[case])
    config = transformers.LlamaConfig(**kw)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    out = tmp_path / case
    model.save_pretrained(out, max_shard_size="100KB" if case == "sharded" else "5GB")
    if case == "sharded":
        assert (out / "model.safetensors.index.json").exists()
    r = subprocess.run([tool, "model", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = dict(item.split("=") for item in r.stdout.split())
    # The transformers config object is the authority for every derived value.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert int(got["head_dim"]) == head_dim and int(got["kv_heads"]) == config.num_key_value_heads
    assert int(got["heads"]) == config.num_attention_heads and int(got["layers"]) == config.num_hidden_layers
    assert int(got["tie"]) == int(config.tie_word_embeddings)
    assert float(got["rope_theta"]) == kw.get("rope_theta", 10000.0)
    assert got["rope"] == ("llama3" if case == "llama3_rope" else "default")
    assert int(got["tensors"]) == len(safetensors_names(out))


def safetensors_names(directory):
    names = set()
    for f in directory.glob("*.safetensors"):
        with safetensors_torch.safe_open(str(f), "pt") as fh:
            names.update(fh.keys())
    return names


def test_transformers_llama_directory_with_a_missing_tensor_is_rejected(tool, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    tensors = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    r = subprocess.run([tool, "model", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "missing model.layers.1.mlp.down_proj.weight" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_float32_logits_equal_transformers(tool, tmp_path, case):
    # qlora's LibTorch Llama (trainer/src/llama.cpp, dense float32) against transformers' eager LlamaForCausalLM on the
    # same checkpoint. Tolerance: 1e-5 relative to the logits' scale (issue 5) plus float32 summation noise; both use
    # float32 throughout and differ only in summation order (SDPA vs eager softmax(QK^T)V, fused vs separate ops).
    model, out = eager_llama(case, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits.float()
    logits_file = str(tmp_path / "logits.safetensors")
    r = subprocess.run([tool, "logits", str(out), logits_file, *map(str, ids[0].tolist())], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    got = safetensors_torch.load_file(logits_file)["logits"]
    assert got.shape == want.shape
    scale = want.abs().max()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("case", ["gqa_tied", "head_dim_bias"])
def test_nf4_model_logits_equal_transformers_on_the_same_quantized_weights(tool, tmp_path, case):
    # The C++ model with every projection NF4 + LoRA (B = 0) against transformers running the dequantized NF4 weights
    # (qlora.quantize_nf4: the same bytes the C++ side produces, which bitsandbytes also produces, test_nf4.py), both
    # in float32: only summation order differs, so the bound is the float32 one of the dense test.
    import qlora

    model, out = eager_llama(case, tmp_path)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in targets:
                module.weight.copy_(qlora.quantize_nf4(module.weight, 64, True).dequantize(torch.float32))
    ids = torch.randint(0, model.config.vocab_size, (1, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits.float()
    logits_file = str(tmp_path / "logits.safetensors")
    r = subprocess.run([tool, "qlogits", str(out), logits_file, *map(str, ids[0].tolist())], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    got = safetensors_torch.load_file(logits_file)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())


def test_peft_loads_the_adapter_and_gives_the_same_logits(tool, tmp_path):
    # issue 5: an adapter saved by qlora loads with peft.PeftModel.from_pretrained without missing/unexpected-key
    # warnings and gives qlora's logits. The transformers base uses the same NF4-dequantized weights for the three
    # targets (q_proj, v_proj, down_proj); float32 throughout, so the dense test's bound applies.
    peft = pytest.importorskip("peft")
    import warnings

    import qlora

    model, base_dir = eager_llama("gqa_tied", tmp_path)
    adapter_dir, logits_file = tmp_path / "adapter", str(tmp_path / "logits.safetensors")
    ids = torch.randint(0, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(3))
    r = subprocess.run([tool, "adapter", str(base_dir), str(adapter_dir), logits_file, *map(str, ids[0].tolist())],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in ("q_proj", "v_proj", "down_proj"):
                module.weight.copy_(qlora.quantize_nf4(module.weight, 64, True).dequantize(torch.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 3 and all(p.abs().max() > 0 for p in lora_b)  # loaded, not left at zero
    with torch.no_grad():
        want = peft_model(ids).logits.float()
    got = safetensors_torch.load_file(logits_file)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())


def _peft_adapter(model, tmp_path, **lora):
    """A PEFT LoRA (r 4, alpha 8 unless given) on q_proj, v_proj, down_proj with random B, saved to tmp_path/peft."""
    peft = pytest.importorskip("peft")
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    cfg.update(lora)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    peft_model.save_pretrained(tmp_path / "peft")
    return peft_model.eval(), tmp_path / "peft"


def test_adapters_trained_by_peft_load_with_the_same_effect(tool, tmp_path):
    # peft -> qlora: the adapter's effect on the logits is PEFT's. Base weights of the targets are NF4 on qlora's side,
    # so the PEFT model runs on the same dequantized NF4 weights (float32; the dense test's bound applies).
    import qlora

    model, base_dir = eager_llama("gqa_tied", tmp_path)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in ("q_proj", "v_proj", "down_proj"):
                module.weight.copy_(qlora.quantize_nf4(module.weight, 64, True).dequantize(torch.float32))
    peft_model, adapter_dir = _peft_adapter(model, tmp_path, use_rslora=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = peft_model(ids).logits.float()
    logits_file = str(tmp_path / "logits.safetensors")
    r = subprocess.run([tool, "load-adapter", str(base_dir), str(adapter_dir), logits_file, *map(str, ids[0].tolist())],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    torch.testing.assert_close(safetensors_torch.load_file(logits_file)["logits"], want, rtol=1e-5,
                               atol=1e-5 * want.abs().max())


def test_mismatched_adapters_name_the_module(tool, tmp_path):
    model, base_dir = eager_llama("gqa_tied", tmp_path)
    _, adapter_dir = _peft_adapter(model, tmp_path)
    weights = str(adapter_dir / "adapter_model.safetensors")
    tensors = safetensors_torch.load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 5)  # rank 5 where the config says 4
    safetensors_torch.save_file(tensors, weights, metadata={"format": "pt"})
    args = [tool, "load-adapter", str(base_dir), str(adapter_dir), str(tmp_path / "l.safetensors"), "1", "2"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 1 and "module model.layers.1.self_attn.v_proj expects [48, 4]" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    import json

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 1 and "key 'use_dora' is true, which qlora does not support" in r.stderr, r.stderr
