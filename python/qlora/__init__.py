"""qlora: QLoRA fine-tuning of Llama models as PyTorch C++/CUDA operators and a native LibTorch trainer.

Importing this package loads the operator library, which registers ``torch.ops.qlora.*``:

* ``nf4_quantize`` / ``nf4_dequantize``: NF4 storage, byte-compatible with bitsandbytes (``qlora.functional``).
* ``adamw8bit_step`` / ``adamw32bit_step`` / ``paged_zeros`` / ``paged_prefetch``: the optimizer steps behind
  ``qlora.optim`` (8-bit and 32-bit, paged AdamW).
* ``nf4_code``, ``dynamic8_code``, ``cpu_isa``, ``_set_cpu_isa``: tables and CPU-kernel controls.

``QLORA_LIBRARY=/path/to/libqlora_ops.so`` loads another build of the same operators (for example the CMake one)
instead of the extension built by ``setup.py``; the CMake build's CUDA kernels, ``libqlora_ops_cuda.so`` beside it,
are loaded with it when present.
"""

from __future__ import annotations

import glob
import os

import torch

__version__ = "0.1.0"


def _library_path() -> str:
    override = os.environ.get("QLORA_LIBRARY")
    if override:
        if not os.path.isfile(override):
            raise ImportError(f"qlora: QLORA_LIBRARY={override} does not exist")
        return override
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_C*.so")))
    if not found:
        raise ImportError(
            "qlora: the operator library qlora/_C*.so is not built; run scripts/setup.sh "
            "(or `pip install --no-build-isolation -e .`) first"
        )
    return found[0]


def _cuda_companion(library: str) -> str | None:
    """The CMake build keeps the CUDA kernels in libqlora_ops_cuda.so beside libqlora_ops.so (so that CPU programs
    never load libtorch_cuda); Python's torch loads CUDA anyway, so it is loaded too when present."""
    if os.path.basename(library) != "libqlora_ops.so":
        return None
    companion = os.path.join(os.path.dirname(library), "libqlora_ops_cuda.so")
    return companion if os.path.isfile(companion) else None


LIBRARY_PATH = _library_path()
torch.ops.load_library(LIBRARY_PATH)
CUDA_LIBRARY_PATH = _cuda_companion(LIBRARY_PATH)
if CUDA_LIBRARY_PATH is not None:
    torch.ops.load_library(CUDA_LIBRARY_PATH)

from . import functional  # noqa: E402
from . import nn  # noqa: E402
from . import optim  # noqa: E402
from .functional import NF4Tensor, causal_attention, dequantize_nf4, quantize_nf4  # noqa: E402

__all__ = ["LIBRARY_PATH", "NF4Tensor", "causal_attention", "dequantize_nf4", "functional", "nn", "optim", "quantize_nf4"]
