"""NF4 storage from Python: quantize, dequantize, and the bitsandbytes state-dict layout.

``quantize_nf4`` / ``dequantize_nf4`` call ``torch.ops.qlora.nf4_quantize`` / ``nf4_dequantize``. ``NF4Tensor`` holds
the quantized state (bitsandbytes' ``QuantState``) and converts to and from the keys bitsandbytes writes into Hugging
Face checkpoints (shared/spec/nf4-and-optimizer.md §1.9), so a weight quantized here loads with
``bitsandbytes.functional.QuantState.from_dict`` and vice versa.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Optional

import torch

__all__ = ["NF4Tensor", "quantize_nf4", "dequantize_nf4", "linear"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_STATE_KEY = "quant_state.bitsandbytes__nf4"


@dataclass(frozen=True)
class NF4Tensor:
    """A tensor quantized to NF4. Shapes (n = numel, B = blocksize, NB = ceil(n/B), NB2 = ceil(NB/256)):

    packed uint8 [(n+1)//2, 1]; absmax float32 [NB] or, double-quantized, uint8 [NB] with nested_absmax float32
    [NB2], nested_code float32 [256] and offset float32 [] (None when not double-quantized).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: Optional[torch.Tensor]
    nested_code: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int

    @property
    def double_quantized(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def nbytes(self) -> int:
        """Bytes of every tensor of the state (what a checkpoint stores, without the 16-entry quant_map)."""
        parts = [self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def dequantize(self, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype, out)

    def to(self, device) -> "NF4Tensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            packed=self.packed.to(device),
            absmax=self.absmax.to(device),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            offset=move(self.offset),
        )

    # ---------------------------------------------------------------------------------------------------------
    # bitsandbytes / Hugging Face checkpoint layout (spec §1.9)

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes' ``Linear4bit`` writes for this weight under ``prefix`` (e.g. ``...q_proj.weight``)."""
        sd = {
            prefix: self.packed,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": torch.ops.qlora.nf4_code().to(self.device),
        }
        meta = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        if self.double_quantized:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
            meta.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": self.offset.item()})
        blob = json.dumps(meta).encode("utf-8")
        sd[f"{prefix}.{_STATE_KEY}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "weight", source: str = "state dict"):
        """Reads a weight written by bitsandbytes (or ``to_bnb_state_dict``). ``source`` names the file in errors."""

        def need(key: str) -> torch.Tensor:
            if key not in sd:
                raise ValueError(f"{source}: missing tensor '{key}' of the NF4 weight '{prefix}'")
            return sd[key]

        state_key = f"{prefix}.{_STATE_KEY}"
        if state_key not in sd and f"{prefix}.quant_state.bitsandbytes__fp4" in sd:
            raise ValueError(f"{source}: '{prefix}' is FP4-quantized; qlora reads NF4 only")
        raw = need(state_key)
        try:
            meta = json.loads(bytes(raw.cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{source}: '{state_key}' is not UTF-8 JSON ({e})") from None
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"{source}: '{state_key}' has quant_type {meta.get('quant_type')!r}, expected 'nf4'")
        if meta.get("dtype") not in _DTYPES:
            raise ValueError(f"{source}: '{state_key}' has dtype {meta.get('dtype')!r}, expected one of {list(_DTYPES)}")
        blocksize = meta.get("blocksize")
        shape = meta.get("shape")
        if not isinstance(blocksize, int) or not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
            raise ValueError(f"{source}: '{state_key}' needs an integer 'blocksize' and a list 'shape', got {meta}")
        quant_map = need(f"{prefix}.quant_map")
        if not torch.equal(quant_map.cpu().float(), torch.ops.qlora.nf4_code()):
            raise ValueError(f"{source}: '{prefix}.quant_map' is not the NF4 code table")
        packed = need(prefix)
        if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage reinterprets the same bytes
            packed = packed.contiguous().view(torch.uint8).reshape(-1, 1)
        nested = "nested_offset" in meta
        state = cls(
            packed=packed,
            absmax=need(f"{prefix}.absmax"),
            nested_absmax=need(f"{prefix}.nested_absmax") if nested else None,
            nested_code=need(f"{prefix}.nested_quant_map") if nested else None,
            offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device) if nested else None,
            shape=torch.Size(shape),
            dtype=_DTYPES[meta["dtype"]],
            blocksize=blocksize,
        )
        if nested and meta.get("nested_blocksize", 256) != 256:
            raise ValueError(f"{source}: '{state_key}' has nested_blocksize {meta['nested_blocksize']}, expected 256")
        return state


def quantize_nf4(
    weight: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    nested_code: Optional[torch.Tensor] = None,
) -> NF4Tensor:
    """Quantizes ``weight`` (float32, bfloat16 or float16) to NF4 exactly as bitsandbytes' CUDA kernels do.

    ``nested_code`` replaces the default signed dynamic map used by double quantization (for example the
    ``nested_quant_map`` of an existing checkpoint).
    """
    packed, absmax, nested_absmax, code, offset = torch.ops.qlora.nf4_quantize(
        weight, blocksize, double_quant, nested_code
    )
    return NF4Tensor(
        packed=packed,
        absmax=absmax,
        nested_absmax=nested_absmax if double_quant else None,
        nested_code=code if double_quant else None,
        offset=offset if double_quant else None,
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=blocksize,
    )


def dequantize_nf4(
    state: NF4Tensor, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dense tensor of ``state.shape`` in ``dtype`` (default: the dtype the weight was quantized from). With ``out``
    (contiguous, exactly that shape; its dtype is used) the values are written there instead of a new tensor."""
    if out is not None:
        torch.ops.qlora.nf4_dequantize_into(
            state.packed,
            state.absmax,
            state.nested_absmax,
            state.nested_code,
            state.offset,
            list(state.shape),
            out.dtype,
            state.blocksize,
            out,
        )
        return out
    return torch.ops.qlora.nf4_dequantize(
        state.packed,
        state.absmax,
        state.nested_absmax,
        state.nested_code,
        state.offset,
        list(state.shape),
        dtype or state.dtype,
        state.blocksize,
    )


def linear(
    x: torch.Tensor,
    weight: NF4Tensor,
    bias: Optional[torch.Tensor] = None,
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: float = 1.0,
    lora_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x @ W^T + bias + lora_scale * (lora_input @ lora_a^T) @ lora_b^T`` with ``W`` the frozen NF4 ``weight``
    ([out_features, in_features]); ``lora_input`` defaults to ``x`` (pass ``dropout(x)`` for LoRA dropout).
    Differentiable in x, lora_input, bias, lora_a and lora_b (torch.ops.qlora.linear)."""
    if weight.shape[-1] != x.shape[-1]:
        raise ValueError(f"qlora.linear: input has {x.shape[-1]} features, weight expects {weight.shape[-1]}")
    return torch.ops.qlora.linear(
        x,
        weight.packed,
        weight.absmax,
        weight.nested_absmax,
        weight.nested_code,
        weight.offset,
        weight.shape[0],
        weight.blocksize,
        bias,
        lora_a,
        lora_b,
        lora_scale,
        lora_input,
    )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Causal grouped-query self-attention, ``F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v),
    is_causal=True)`` without materialising the repeated keys or the attention matrix (torch.ops.qlora.causal_attention).

    q is [batch, heads, tokens, head_dim]; k and v are [batch, kv_heads, tokens, head_dim] with heads a multiple of
    kv_heads (query head h reads key/value head h // (heads // kv_heads), as transformers' repeat_kv). With
    ``segment_ids`` [batch, tokens] (int32 or int64), a query sees only earlier keys of its own segment (packed rows).
    ``scale`` defaults to 1/sqrt(head_dim). Differentiable in q, k and v. The result is stored as [batch, tokens,
    heads, head_dim], so ``out.transpose(1, 2).reshape(batch, tokens, -1)`` is a view."""
    out, _ = torch.ops.qlora.causal_attention(q, k, v, segment_ids, scale)
    return out
