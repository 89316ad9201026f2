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
