"""``torch.nn`` layers over qlora's operators: a frozen NF4 linear, its LoRA-wrapped variant, and a function that
swaps the chosen ``nn.Linear`` modules of any model (e.g. a transformers ``LlamaForCausalLM``) for them.

LoRA follows PEFT's conventions (shared/spec/formats-and-ops.md §3.3): ``lora_A`` [r, in] initialised
Kaiming-uniform (a = sqrt(5)), ``lora_B`` [out, r] zeros, scale ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rsLoRA), dropout applied to the LoRA branch's input only.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from .functional import NF4Tensor, linear, quantize_nf4

__all__ = ["Linear4bit", "LoraLinear4bit", "replace_linear_with_qlora", "trainable_parameters_report"]

_STATE = ("packed", "absmax", "nested_absmax", "nested_code", "offset")


class Linear4bit(nn.Module):
    """y = x W^T + b with W frozen in NF4 (bitsandbytes layout). The NF4 tensors are buffers: they move with
    ``.to()`` and are saved in ``state_dict`` but are never parameters."""

    def __init__(self, weight: NF4Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"Linear4bit: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype
        for name in _STATE:
            self.register_buffer(name, getattr(weight, name), persistent=True)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, module: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "Linear4bit":
        return cls(quantize_nf4(module.weight.detach(), blocksize, double_quant), module.bias)

    @property
    def weight(self) -> NF4Tensor:
        return NF4Tensor(
            packed=self.packed,
            absmax=self.absmax,
            nested_absmax=self.nested_absmax,
            nested_code=self.nested_code,
            offset=self.offset,
            shape=torch.Size([self.out_features, self.in_features]),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return linear(x, self.weight, bias)

    def extra_repr(self) -> str:
        dq = "double-quantized " if self.absmax.dtype == torch.uint8 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {dq}NF4 blocksize={self.blocksize}"


class LoraLinear4bit(Linear4bit):
    """Linear4bit plus a trainable LoRA update: y = x W^T + b + scale * (dropout(x) A^T) B^T."""

    def __init__(
        self,
        weight: NF4Tensor,
        bias: Optional[torch.Tensor] = None,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(weight, bias)
        if r <= 0:
            raise ValueError(f"LoraLinear4bit: r must be positive, got {r}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=lora_dtype, device=self.packed.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=lora_dtype, device=self.packed.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    @classmethod
    def from_linear(cls, module: nn.Linear, blocksize: int = 64, double_quant: bool = True, **lora) -> "LoraLinear4bit":
        return cls(quantize_nf4(module.weight.detach(), blocksize, double_quant), module.bias, **lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        xl = self.lora_dropout(x)
        return linear(x, self.weight, bias, a, b, self.scaling, None if xl is x else xl)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


def replace_linear_with_qlora(
    model: nn.Module,
    target_modules: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
    lora_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Replaces every ``nn.Linear`` whose attribute name is in ``target_modules`` (PEFT's matching by name suffix)
    with a LoraLinear4bit, in place, and freezes everything except the LoRA matrices. Returns the model."""
    targets = set(target_modules)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                new = LoraLinear4bit.from_linear(
                    child, blocksize, double_quant, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    use_rslora=use_rslora, lora_dtype=lora_dtype,
                )
                setattr(parent, name, new)
                replaced += 1
    if replaced == 0:
        raise ValueError(f"replace_linear_with_qlora: no nn.Linear named any of {sorted(targets)} in the model")
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.endswith("lora_A") or pname.endswith("lora_B"))
    return model


def trainable_parameters_report(model: nn.Module) -> str:
    """PEFT's report line. NF4 weights count at their logical size (out * in), like PEFT counts 4-bit weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Linear4bit):
            total += m.out_features * m.in_features
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
