"""Shared fixtures for qlora's Python tests: every test starts from the same RNG state and CPU ISA."""

import contextlib
import os

import pytest
import torch

import qlora  # noqa: F401  (registers torch.ops.qlora)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def supported_isas() -> list[str]:
    """CPU instruction sets this machine can run: always 'scalar', plus 'avx2' / 'avx512' when present."""
    saved = torch.ops.qlora.cpu_isa()
    out = []
    for isa in ("scalar", "avx2", "avx512"):
        try:
            torch.ops.qlora._set_cpu_isa(isa)
            out.append(isa)
        except RuntimeError:
            pass
    torch.ops.qlora._set_cpu_isa(saved)
    return out


@contextlib.contextmanager
def cpu_isa(isa: str):
    saved = torch.ops.qlora.cpu_isa()
    torch.ops.qlora._set_cpu_isa(isa)
    try:
        yield
    finally:
        torch.ops.qlora._set_cpu_isa(saved)


@pytest.fixture(autouse=True)
def _reseed():
    torch.manual_seed(0)
    yield


def has_cuda() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("qlora::nf4_quantize", "CUDA")


requires_cuda = pytest.mark.skipif(not has_cuda(), reason="no CUDA device on this machine")


def cmake_binary(name: str) -> str:
    """build/bin/<name>, built by CMake: skips the test without a CMake build, fails under scripts/test.sh (which sets
    QLORA_REQUIRE_CMAKE_BUILD=1) if the build did not produce it."""
    path = os.path.join(REPO, "build", "bin", name)
    if not os.path.exists(path):
        if os.environ.get("QLORA_REQUIRE_CMAKE_BUILD") == "1":
            pytest.fail(f"{path} is missing: the CMake build did not produce it")
        pytest.skip("CMake build not present (run scripts/test.sh)")
    return path


# The C++ test driver of the trainer library (trainer/tools/safetensors_tool.cpp), built by CMake.
TOOL = os.path.join(REPO, "build", "bin", "qlora_safetensors")


@pytest.fixture(scope="module")
def tool():
    return cmake_binary("qlora_safetensors")


@pytest.fixture(scope="module")
def qlora_bin():
    """The `qlora` command (trainer/tools/qlora_main.cpp)."""
    return cmake_binary("qlora")


LLAMA_CASES = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "head_dim_bias": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, attention_bias=True,
                          mlp_bias=True),
    "llama3_rope": dict(num_attention_heads=4, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                        rope_theta=500000.0),
    "sharded": dict(num_attention_heads=6, num_key_value_heads=2),
}


def eager_llama(case, tmp_path, **overrides):
    """A transformers LlamaForCausalLM of LLAMA_CASES[case] (eager attention, float32, weights widened from the tiny
    default std 0.02 so every layer matters) with `overrides` of its config, saved to tmp_path/case; returns (model,
    directory)."""
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=200, hidden_size=96, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=128)
    kw.update(LLAMA_CASES[case])
    kw.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 1.0)
    out = tmp_path / case
    model.save_pretrained(out, max_shard_size="100KB" if case == "sharded" else "5GB")
    return model, out
