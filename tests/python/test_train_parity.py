"""Golden parity of `qlora train` with the Python stack: the same tiny Llama, the same adapter to start from
(lora_model_dir), the same token ids (qlora preprocess --dump) in the same order, torch's AdamW on both sides: the
losses of the first optimizer steps equal those of a transformers + PEFT loop on the same NF4-dequantized base
weights."""

import json
import subprocess

import pytest
import torch

from conftest import eager_llama
from test_train_cli import TOKENIZER  # qlora_bin is a conftest fixture

safetensors_torch = pytest.importorskip("safetensors.torch")
peft = pytest.importorskip("peft")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_first_steps_match_transformers_and_peft(qlora_bin, tmp_path):
    import qlora

    model, directory = eager_llama("gqa_tied", tmp_path, vocab_size=2048, hidden_size=128, intermediate_size=256)
    with torch.no_grad():  # the base PEFT trains on: qlora's NF4 weights, dequantized
        for name, module in model.named_modules():
            if name.split(".")[-1] in ALL:
                module.weight.copy_(qlora.quantize_nf4(module.weight, 64, True).dequantize(torch.float32))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL), lora_dropout=0.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pm.save_pretrained(tmp_path / "start")
    data = tmp_path / "data.jsonl"
    verses = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light.",
              "And the evening and the morning were the first day.", "The LORD is my shepherd; I shall not want.",
              "Jesus wept.", "And God saw the light, that it was good."]
    data.write_text("".join(json.dumps({"text": v}) + "\n" for v in verses))
    steps = 5
    cfg = {"base_model": str(directory), "tokenizer": TOKENIZER, "adapter": "qlora", "lora_r": 4, "lora_alpha": 8,
           "lora_dropout": 0.0, "lora_target_linear": True, "lora_model_dir": str(tmp_path / "start"),
           "datasets": [{"path": str(data), "type": "text"}], "shuffle_merged_datasets": False, "sequence_len": 64,
           "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": steps, "optimizer": "adamw_torch",
           "lr_scheduler": "constant", "learning_rate": 1e-3, "weight_decay": 0.0, "max_grad_norm": 0.0,
           "num_threads": 1, "output_dir": str(tmp_path / "out")}
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps(cfg))
    dump = tmp_path / "tokens.jsonl"
    subprocess.run([qlora_bin, "preprocess", str(config), "--dump", str(dump)], check=True, capture_output=True)
    examples = [json.loads(line) for line in dump.read_text().splitlines()]
    r = subprocess.run([qlora_bin, "train", str(config)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    got = [row["loss"] for row in rows if "loss" in row]
    got_norm = [row["grad_norm"] for row in rows if "loss" in row]

    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    pm.train()
    want, want_norm = [], []
    for ex in examples[:steps]:
        ids = torch.tensor([ex["input_ids"]])
        loss = pm(input_ids=ids, labels=torch.tensor([ex["labels"]])).loss
        loss.backward()
        trained = [p for p in pm.parameters() if p.requires_grad]
        want_norm.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trained)).item())
        opt.step()
        opt.zero_grad()
        want.append(loss.item())
    # float32 on both sides; the first loss differs only by summation order (1e-5, as for logits), later ones also
    # carry the optimizer's response to gradients equal within float32 noise.
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert got == pytest.approx(want, rel=1e-4)
    # Adam is nearly blind to the gradients' scale, so the LoRA gradients are compared as well, through their global
    # norm at every step (a wrong loss normalisation or a missing term would show here): same bound as the losses.
    assert got_norm == pytest.approx(want_norm, rel=1e-4)
    assert want[-1] < want[0]  # it learns
