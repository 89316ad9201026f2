"""The two front ends build the same operator library: the extension from setup.py (qlora/_C*.so) and the CMake
libraries (build/lib/libqlora_ops.so, plus libqlora_ops_cuda.so with the CUDA kernels) must register the same schemas
with kernels for the same dispatch keys. Each build is loaded in its own process (a library can register the qlora
namespace only once per process). CPU programs built with CMake (the trainer) must not load LibTorch's CUDA half."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

import qlora

CMAKE_LIBRARY = os.path.join(REPO, "build", "lib", "libqlora_ops.so")
CMAKE_CUDA_LIBRARY = os.path.join(REPO, "build", "lib", "libqlora_ops_cuda.so")  # the CUDA kernels, with CUDA
KEYS = ["CPU", "CUDA", "Meta", "Autograd", "CompositeExplicitAutograd", "CompositeImplicitAutograd"]

PROBE = """
import json, sys, torch
for library in sys.argv[1:]:
    torch.ops.load_library(library)
out = {}
for name in sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("qlora::")):
    base, _, overload = name.split("::")[1].partition(".")
    op = getattr(getattr(torch.ops.qlora, base), overload or "default")
    keys = [k for k in %r if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
    out[name] = {"schema": str(op._schema), "keys": keys}
print(json.dumps(out))
""" % (KEYS,)


def registrations(*libraries: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, *libraries], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_setup_py_and_cmake_libraries_register_the_same_kernels():
    if not os.path.isfile(CMAKE_LIBRARY):
        if os.environ.get("QLORA_REQUIRE_CMAKE_BUILD") == "1":
            pytest.fail(f"{CMAKE_LIBRARY} is missing; the CMake build must run before this test")
        pytest.skip("CMake build not present (run scripts/test.sh)")
    cmake = [CMAKE_LIBRARY] + ([CMAKE_CUDA_LIBRARY] if os.path.isfile(CMAKE_CUDA_LIBRARY) else [])
    ext, lib = registrations(qlora.LIBRARY_PATH), registrations(*cmake)
    assert ext == lib
    for op in ("qlora::nf4_quantize", "qlora::nf4_dequantize"):
        assert {"CPU", "Meta", "Autograd"} <= set(ext[op]["keys"]), op
        if os.environ.get("QLORA_BUILD_CUDA") != "0":
            assert "CUDA" in ext[op]["keys"], f"{op}: CUDA kernels were not built (set QLORA_BUILD_CUDA=0 for CPU-only)"


def test_the_trainer_does_not_load_libtorch_cuda():
    """`qlora` runs on the CPU; linking libtorch_cuda would cost every run about 270 MB of resident memory."""
    binary = os.path.join(REPO, "build", "bin", "qlora")
    if not os.path.isfile(binary):
        if os.environ.get("QLORA_REQUIRE_CMAKE_BUILD") == "1":
            pytest.fail(f"{binary} is missing; the CMake build must run before this test")
        pytest.skip("CMake build not present (run scripts/test.sh)")
    needed = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    assert "libtorch_cpu.so" in needed
    # (libtorch_cpu itself needs libcudart and libcupti, for its profiler; they are small.)
    for lib in ("libtorch_cuda.so", "libc10_cuda.so", "libcublas", "libcudnn", "libnccl"):
        assert lib not in needed, f"{binary} loads {lib}"
    if os.path.isfile(CMAKE_CUDA_LIBRARY):  # and the CUDA kernels library does need it
        assert "libtorch_cuda.so" in subprocess.run(["ldd", CMAKE_CUDA_LIBRARY], capture_output=True, text=True,
                                                   check=True).stdout
