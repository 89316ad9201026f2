"""A small, strict safetensors reader and writer in plain Python (no ``safetensors`` package at run time), and the
atomic file write that qlora's adapter files go through.

Format (shared/spec/formats-and-ops.md §1): an 8-byte little-endian u64 N, N bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the data buffer,
offsets relative to its start. The reader checks everything the reference reader checks (§1.4) and, like the
project's C++ reader, also refuses duplicate names and unknown entry fields; every problem is a one-line
``ValueError("<file>: <problem>")``. The writer lays tensors out as the reference writer does (largest dtype first,
then by name, header padded with spaces to 8 bytes), so with at most one metadata key its files are byte-identical
to ``safetensors.torch.save_file``'s.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping
from typing import Union

import torch

__all__ = ["DTYPES", "load_file", "read_file", "save_file", "write_file_atomically"]

# safetensors dtype name -> torch dtype, in the order of the reference's Dtype enum (increasing alignment); the
# writer sorts by this rank, largest first. Sub-byte types (F4, F6_*) and the exotic F8 variants have no torch dtype
# here and are refused.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_RANK = {name: i for i, name in enumerate(DTYPES)}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
MAX_HEADER = 100_000_000  # the reference's cap, checked before anything is allocated

PathLike = Union[str, "os.PathLike[str]"]


def _fail(path: PathLike, problem: str) -> ValueError:
    return ValueError(f"{os.fspath(path)}: {problem}")


def _no_duplicates(path: PathLike):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _fail(path, f"the header names {key!r} twice")
            seen.add(key)
        return dict(pairs)

    return hook


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_file(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a whole safetensors file: (tensors in header order, on the CPU, each in its own aligned memory;
    ``__metadata__`` or {})."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise _fail(path, f"the file is {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER:
            raise _fail(path, f"header length {n} exceeds the limit of {MAX_HEADER} bytes")
        if 8 + n > size:
            raise _fail(path, f"header length {n} runs past the end of the {size}-byte file")
        raw = f.read(n)
        buffer = bytearray(f.read())
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path))
    except UnicodeDecodeError as e:
        raise _fail(path, f"the header is not UTF-8 ({e.reason} at byte {8 + e.start})") from None
    except json.JSONDecodeError as e:
        raise _fail(path, f"the header is not JSON ({e.msg} at header byte {e.pos})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"the header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, f"'__metadata__' must map strings to strings, got {json.dumps(metadata)}")

    entries = []  # (begin, end, name, dtype, shape)
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise _fail(path, f"{where} must be an object with dtype, shape and data_offsets, got {json.dumps(info)}")
        if set(info) != _ENTRY_KEYS:
            missing, extra = sorted(_ENTRY_KEYS - set(info)), sorted(set(info) - _ENTRY_KEYS)
            raise _fail(path, f"{where} must have exactly dtype, shape and data_offsets (missing {missing}, "
                              f"unknown {extra})")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise _fail(path, f"{where} has dtype {json.dumps(dtype)}, expected one of {list(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _fail(path, f"{where} has shape {json.dumps(shape)}, expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _fail(path, f"{where} has data_offsets {json.dumps(offsets)}, expected [begin, end] with "
                              "0 <= begin <= end")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise _fail(path, f"{where} ({dtype} {shape}) needs {nbytes} bytes but its data_offsets "
                              f"{offsets} span {offsets[1] - offsets[0]}")
        entries.append((offsets[0], offsets[1], name, DTYPES[dtype], shape))

    # The tensors must tile the buffer exactly: no gap, no overlap, nothing after the last one.
    pos, prev = 0, None
    for begin, end, name, _, _ in sorted(entries):
        if begin < pos:
            raise _fail(path, f"tensors {prev!r} and {name!r} overlap in the data buffer (bytes {begin}..{pos})")
        if begin > pos:
            raise _fail(path, f"bytes {pos}..{begin} of the data buffer belong to no tensor (before {name!r})")
        pos, prev = end, name
    if pos != len(buffer):
        what = "is truncated" if pos > len(buffer) else "has trailing bytes"
        raise _fail(path, f"the file {what}: the tensors cover {pos} bytes of data, the file holds {len(buffer)}")

    if sys.byteorder != "little":  # safetensors data is little-endian; torch.frombuffer reads native order
        raise _fail(path, "reading safetensors needs a little-endian machine")
    tensors = {}
    for begin, end, name, dtype, shape in entries:
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:  # clone: its own, aligned memory (offsets in the file need not be aligned)
            raw_bytes = torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin, offset=begin).clone()
            tensors[name] = raw_bytes.view(dtype).reshape(shape)
    return tensors, metadata


def load_file(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (``read_file`` without the metadata)."""
    return read_file(path)[0]


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_file_atomically(path: PathLike, chunks: Iterable[bytes]) -> None:
    """Writes ``chunks`` to ``path`` so that readers see the old file or the whole new one, never a part: a temporary
    file in the same directory, fsync, ``os.replace``, then fsync of the directory. On error the temporary file is
    removed and ``path`` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_file(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``tensors`` (any device, strides or dtype of ``DTYPES``; their bytes are copied) to ``path`` atomically,
    with ``metadata`` as ``__metadata__``."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(path, f"metadata must map strings to strings, got {dict(metadata)!r}")
    items = []
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise _fail(path, f"tensor name {name!r} is not allowed (a string other than '__metadata__')")
        if not isinstance(t, torch.Tensor):
            raise _fail(path, f"{name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in _NAMES:
            raise _fail(path, f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store here "
                              f"(supported: {sorted(_NAMES, key=str)})")
        items.append((name, t))
    items.sort(key=lambda it: (-_RANK[_NAMES[it[1].dtype]], it[0]))

    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned (the reference's padding)

    buffer = bytearray(pos)
    for name, t in items:
        if t.numel():
            begin = header[name]["data_offsets"][0]
            src = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            torch.frombuffer(buffer, dtype=torch.uint8, count=src.numel(), offset=begin).copy_(src)
    write_file_atomically(path, [len(raw).to_bytes(8, "little"), raw, buffer])
