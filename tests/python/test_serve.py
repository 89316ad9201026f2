"""What users do after training (issue 7), through the `qlora` binary on the bundled fine-tuned default
(models/tiny-kjv + models/tiny-kjv-qlora): `qlora merge` output loads in transformers and equals PEFT's own merge of
the same adapter into the same NF4 weights; the TorchScript export loads with stock PyTorch (a process that never
imports qlora) with transformers' logits; generation with the adapter ends at EOS; the KV cache changes nothing; adapter
hot-swap in --chat gives A's text again after B; bad adapters give one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

import qlora
from conftest import REPO

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

QLORA = os.path.join(REPO, "build", "bin", "qlora")
BASE = os.path.join(REPO, "models", "tiny-kjv")
ADAPTER = os.path.join(REPO, "models", "tiny-kjv-qlora")
INSTRUCTION = "Complete the verse from the King James Bible."
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run(*args, check=True, stdin=None):
    r = subprocess.run([QLORA, *map(str, args)], capture_output=True, text=True, input=stdin, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"qlora {' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def merged(qlora_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged"
    r = run("merge", "--base", BASE, "--adapter", ADAPTER, "--out", out, "--dtype", "fp32")
    return out, r.stdout


def heldout(n):
    with open(os.path.join(REPO, "data", "tiny-kjv", "heldout.jsonl")) as f:
        return [json.loads(line)["input"] for line in f][:n]


def test_merge_prints_a_probe_within_float32_rounding(merged):
    _, stdout = merged
    assert "merged 28 projections" in stdout
    line = next(x for x in stdout.splitlines() if x.startswith("probe:"))
    diff, largest = float(line.split()[4]), float(line.split("largest |logit| ")[1].split(")")[0])
    # W + s·B·A folded in float32 vs the same terms applied per token: a few float32 ulps of the logit scale.
    assert diff <= 1e-5 * largest, line


def test_merged_checkpoint_equals_peft_merge_and_loads_in_transformers(merged):
    out, _ = merged
    # PEFT's merge_and_unload of the same adapter over the weights the adapter was trained on: the NF4 round trip of
    # every target (qlora's quantizer is byte-compatible with bitsandbytes, tested in test_nf4.py).
    base = transformers.LlamaForCausalLM.from_pretrained(BASE, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, mod in base.named_modules():
            if name.split(".")[-1] in TARGETS:
                mod.weight.copy_(qlora.quantize_nf4(mod.weight, 64, True).dequantize().to(torch.float32))
    model = peft.PeftModel.from_pretrained(base, ADAPTER).eval()
    ids = torch.randint(0, 2048, (2, 24))
    with torch.no_grad():
        adapter_logits = model(ids).logits
        want = model.merge_and_unload().state_dict()
    got = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert set(got) == set(want)  # untied model: lm_head.weight is a tensor of its own
    for k, w in got.items():
        # Same float32 terms (B @ A times the scale, added to W): at most an ulp or two of the weight.
        torch.testing.assert_close(w, want[k], rtol=0, atol=4 * torch.finfo(torch.float32).eps * want[k].abs().max())
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    with torch.no_grad():
        logits = loaded(ids).logits
    assert (logits - adapter_logits).abs().max() <= 1e-5 * adapter_logits.abs().max()


def test_torchscript_loads_in_stock_pytorch_with_transformers_logits(qlora_bin, merged, tmp_path):
    out, _ = merged
    archive = tmp_path / "model.pt"
    assert "wrote" in run("export", "--format", "torchscript", "--model", out, "--out", archive).stdout
    ids = torch.randint(0, 2048, (2, 19))
    safetensors_torch.save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    script = (
        "import sys, torch, warnings\n"
        "from safetensors.torch import load_file, save_file\n"
        "warnings.simplefilter('ignore', FutureWarning)  # torch.jit.load is deprecated in 2.14, still supported\n"
        f"m = torch.jit.load({str(archive)!r})\n"
        f"ids = load_file({str(tmp_path / 'ids.safetensors')!r})['ids']\n"
        f"save_file({{'logits': m(ids)}}, {str(tmp_path / 'logits.safetensors')!r})\n"
        "assert not any(k == 'qlora' or k.startswith('qlora.') for k in sys.modules), 'qlora was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-S", "-c", "import site; site.main()\n" + script], check=True, env=env,
                   cwd=str(tmp_path), timeout=300)
    got = safetensors_torch.load_file(str(tmp_path / "logits.safetensors"))["logits"]
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(ids).logits
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_generation_with_the_bundled_adapter_ends_at_eos(qlora_bin):
    prompts = heldout(16)
    ended = {"base": 0, "adapter": 0}
    for text in prompts:
        for who, extra in (("base", []), ("adapter", ["--adapter", ADAPTER])):
            r = run("generate", "--model", BASE, *extra, "--alpaca", INSTRUCTION, "--input", text,
                    "--max-new-tokens", 64)
            ended[who] += r.stdout.rstrip().endswith("[EOS]")
    # The fine-tune teaches the format: the demo's 40 held-out prompts end at EOS 39 times with the adapter, 19
    # without; on these 16 nearly all must end, and clearly more than without it.
    assert ended["adapter"] >= 14 and ended["adapter"] >= ended["base"] + 4, ended


def test_kv_cache_changes_no_token(qlora_bin):
    for text in heldout(3):
        args = ["generate", "--model", BASE, "--adapter", ADAPTER, "--alpaca", INSTRUCTION, "--input", text,
                "--max-new-tokens", 40]
        assert run(*args).stdout == run(*args, "--no-kv-cache").stdout


def test_chat_hot_swap_returns_to_the_first_adapter_and_none_is_the_base(qlora_bin, tmp_path):
    # Adapter B: A with its B matrices negated (the opposite update).
    other = tmp_path / "negated"
    other.mkdir()
    tensors = safetensors_torch.load_file(os.path.join(ADAPTER, "adapter_model.safetensors"))
    safetensors_torch.save_file({k: -v if "lora_B" in k else v for k, v in tensors.items()},
                                str(other / "adapter_model.safetensors"))
    (other / "adapter_config.json").write_text(open(os.path.join(ADAPTER, "adapter_config.json")).read())
    question = "Who was Moses?"
    session = "\n".join([question, "/reset", "/adapter b", question, "/reset", "/adapter a", question, "/reset",
                         "/adapter none", question]) + "\n"
    r = run("generate", "--model", BASE, "--adapter", f"a={ADAPTER}", "--adapter", f"b={other}", "--chat",
            "--max-new-tokens", 24, stdin=session)
    lines = [x for x in r.stdout.splitlines() if x and not x.startswith("[") and not x.startswith("chat:")]
    assert len(lines) == 4, r.stdout
    a1, b, a2, none = lines
    assert a1 == a2, "A -> B -> A must give A's answer again"
    assert a1 != b and a1 != none
    base_only = run("generate", "--model", BASE, "--chat", "--max-new-tokens", 24, stdin=question + "\n")
    assert none in base_only.stdout.splitlines(), (none, base_only.stdout)
    bad = run("generate", "--model", BASE, "--adapter", f"a={ADAPTER}", "--chat", stdin="/adapter c\n")
    assert "[no adapter named 'c' (loaded: none, a)]" in bad.stdout


def test_bad_adapters_and_refused_merges_give_one_line_errors(qlora_bin, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(open(os.path.join(ADAPTER, "adapter_config.json")).read())
    data = open(os.path.join(ADAPTER, "adapter_model.safetensors"), "rb").read()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    for args in (["merge", "--base", BASE, "--adapter", broken, "--out", tmp_path / "m"],
                 ["generate", "--model", BASE, "--adapter", broken, "--prompt", "In the beginning"]):
        r = run(*args, check=False)
        assert r.returncode == 1
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and str(broken / "adapter_model.safetensors") in err, err
    assert not (tmp_path / "m").exists()
    r = run("merge", "--base", BASE, "--adapter", ADAPTER, "--out", tmp_path / "m4", "--dtype", "nf4", check=False)
    assert r.returncode == 1 and "pass --force" in r.stderr and not (tmp_path / "m4").exists()
    r = run("merge", "--base", BASE, "--adapter", ADAPTER, "--out", tmp_path / "m4", "--dtype", "nf4", "--force")
    assert "rounding cost of 4-bit: relative RMS error" in r.stdout
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "m4"))  # bitsandbytes 4-bit on the CPU
    assert loaded.config.quantization_config.load_in_4bit
    r = run("export", "--format", "onnx", "--model", BASE, "--out", tmp_path / "x", check=False)
    assert r.returncode == 1 and "--format must be torchscript or safetensors" in r.stderr


def test_init_nf4_writes_a_bitsandbytes_checkpoint_without_a_dense_model(qlora_bin, tmp_path):
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", vocab_size=512,
               hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    run("init", tmp_path / "config.json", tmp_path / "m", "--nf4", "--dtype", "bf16", "--seed", "4")
    files = safetensors_torch.load_file(str(tmp_path / "m" / "model.safetensors"))
    assert files["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8  # packed NF4
    assert files["model.embed_tokens.weight"].dtype == torch.bfloat16
    m = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert type(m.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    # The weights are transformers' init, N(0, 0.02), up to NF4 rounding (about 10 % RMS, unbiased in the std).
    state = m.model.layers[0].self_attn.q_proj.weight.quant_state
    import bitsandbytes.functional as bnbf
    w = bnbf.dequantize_4bit(m.model.layers[0].self_attn.q_proj.weight.data, state).float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 5, 9]])).logits).all()
