"""Builds the Python package ``qlora`` and its operator library ``qlora._C`` with torch.utils.cpp_extension.

    pip install --no-build-isolation -e .      (scripts/setup.sh does this)

Sources follow the same rule as CMakeLists.txt: csrc/*.cpp + csrc/cpu/*.cpp, plus csrc/cuda/*.cu when the CUDA
kernels are built (tests/python/test_build.py checks that both builds register the same kernels). The CUDA kernels
are built when torch is a CUDA build and nvcc is found; QLORA_BUILD_CUDA=0 forces a CPU-only build, =1 requires CUDA.
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0". Build isolation must stay off: an isolated build could pull a different
torch than the pinned torch==2.14.1.
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    # cpp_extension would otherwise derive CUDA_HOME from `which nvcc` (/usr/local/bin is a wrapper here).
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> bool:
    flag = os.environ.get("QLORA_BUILD_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None
    if flag == "0":
        return False
    if flag == "1" and not available:
        raise RuntimeError("QLORA_BUILD_CUDA=1 but torch is not a CUDA build or nvcc/CUDA_HOME is missing")
    return available


def qlora_sources(with_cuda: bool) -> list[str]:
    """The operator library's sources; the same rule as QLORA_OPS_SOURCES in CMakeLists.txt."""
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    if with_cuda:
        sources += rel("csrc/cuda/*.cu")
    return sources


with_cuda = want_cuda()
# -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in torch's headers; without it the CPU kernels are
# single-threaded. -fno-wrapv undoes the -fwrapv in Python's own CFLAGS (defined signed overflow blocks index
# optimizations: the AdamW kernel ran 25 % slower with it); the CMake build never had it.
cxx_flags = ["-O3", "-fno-wrapv", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wno-unused-parameter"]
nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-Xcompiler=-ffp-contract=off"]
Extension = CUDAExtension if with_cuda else CppExtension
ext = Extension(
    name="qlora._C",
    sources=qlora_sources(with_cuda),
    include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")],
    define_macros=[("QLORA_WITH_CUDA", "1")] if with_cuda else [],
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags},
    extra_link_args=["-fopenmp"],
)

setup(
    name="qlora",
    version="0.1.0",
    description="QLoRA fine-tuning of Llama models: NF4, fused LoRA linear and paged 8-bit AdamW as PyTorch ops",
    package_dir={"": "python"},
    packages=["qlora"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch==2.14.1"],
)
