"""The two front ends build the same operator library: the extension from setup.py (qlora/_C*.so) and the CMake
library (build/lib/libqlora_ops.so) must register the same schemas with kernels for the same dispatch keys. Each is
loaded in its own process (a library can register the qlora namespace only once per process)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

import qlora

CMAKE_LIBRARY = os.path.join(REPO, "build", "lib", "libqlora_ops.so")
KEYS = ["CPU", "CUDA", "Meta", "Autograd", "CompositeExplicitAutograd", "CompositeImplicitAutograd"]

PROBE = """
import json, sys, torch
torch.ops.load_library(sys.argv[1])
out = {}
for name in sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("qlora::")):
    base, _, overload = name.split("::")[1].partition(".")
    op = getattr(getattr(torch.ops.qlora, base), overload or "default")
    keys = [k for k in %r if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
    out[name] = {"schema": str(op._schema), "keys": keys}
print(json.dumps(out))
""" % (KEYS,)


def registrations(library: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, library], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_setup_py_and_cmake_libraries_register_the_same_kernels():
    if not os.path.isfile(CMAKE_LIBRARY):
        if os.environ.get("QLORA_REQUIRE_CMAKE_BUILD") == "1":
            pytest.fail(f"{CMAKE_LIBRARY} is missing; the CMake build must run before this test")
        pytest.skip("CMake build not present (run scripts/test.sh)")
    ext, lib = registrations(qlora.LIBRARY_PATH), registrations(CMAKE_LIBRARY)
    assert ext == lib
    for op in ("qlora::nf4_quantize", "qlora::nf4_dequantize"):
        assert {"CPU", "Meta", "Autograd"} <= set(ext[op]["keys"]), op
        if os.environ.get("QLORA_BUILD_CUDA") != "0":
            assert "CUDA" in ext[op]["keys"], f"{op}: CUDA kernels were not built (set QLORA_BUILD_CUDA=0 for CPU-only)"
