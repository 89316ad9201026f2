"""``torch.nn`` layers over qlora's operators: a frozen NF4 linear, its LoRA-wrapped variant, and a function that
swaps the chosen ``nn.Linear`` modules of any model (e.g. a transformers ``LlamaForCausalLM``) for them.

LoRA follows PEFT's conventions (shared/spec/formats-and-ops.md §3.3): ``lora_A`` [r, in] initialised
Kaiming-uniform (a = sqrt(5)), ``lora_B`` [out, r] zeros, scale ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rsLoRA), dropout applied to the LoRA branch's input only.

Adapter hot-swap: a ``LoraLinear4bit`` holds any number of named adapters over one frozen NF4 weight; ``"default"``
is the pair it was built with (``lora_A`` / ``lora_B``), others are added with ``add_adapter`` and chosen with
``set_adapter`` (``None`` runs the bare NF4 layer). Switching changes which tensors the forward reads and nothing
else: the NF4 weight is never re-quantized or copied. ``load_peft_adapter``, ``save_peft_adapter`` and
``set_active_adapter`` do the same for a whole model in PEFT's directory format (spec §3.1-3.2), through
``qlora.safetensors_io`` (the ``safetensors`` package is not needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from . import safetensors_io
from .functional import NF4Tensor, linear, quantize_nf4

__all__ = [
    "Linear4bit",
    "LoraAdapter",
    "LoraLinear4bit",
    "load_peft_adapter",
    "replace_linear_with_qlora",
    "save_peft_adapter",
    "set_active_adapter",
    "trainable_parameters_report",
]

_STATE = ("packed", "absmax", "nested_absmax", "nested_code", "offset")


class Linear4bit(nn.Module):
    """y = x W^T + b with W frozen in NF4 (bitsandbytes layout). The NF4 tensors are buffers: they move with
    ``.to()`` and are saved in ``state_dict`` but are never parameters."""

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None):
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
    def from_linear(cls, module: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> Linear4bit:
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


class LoraAdapter(NamedTuple):
    """One adapter of a LoraLinear4bit as ``get_adapter`` returns it (the layer's own tensors, not copies).
    ``lora_alpha`` and ``use_rslora`` are the PEFT settings that give ``scaling``; they are what
    ``save_peft_adapter`` writes."""

    lora_A: torch.Tensor  # [r, in_features]
    lora_B: torch.Tensor  # [out_features, r]
    scaling: float
    lora_alpha: float
    use_rslora: bool

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


class _NamedAdapter(nn.Module):
    """Storage of an added adapter: two frozen parameters (so they move with ``.to()`` and appear in ``state_dict``
    as ``lora_adapters.<name>.lora_A`` / ``.lora_B``) and its scale."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, lora_alpha: float, use_rslora: bool):
        super().__init__()
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)
        self.scaling = scaling
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


_RESERVED = ("default", "none")


def _adapter_key(name: str | None) -> str | None:
    """None and "none" both mean "no adapter"."""
    return None if name is None or name == "none" else name


class LoraLinear4bit(Linear4bit):
    """Linear4bit plus a trainable LoRA update: y = x W^T + b + scale * (dropout(x) A^T) B^T.

    The layer holds named adapters: ``"default"`` is ``lora_A`` / ``lora_B`` / ``scaling`` (the pair built here,
    trainable), more come from ``add_adapter`` (frozen; ``requires_grad_()`` them to train one). ``set_adapter``
    picks the one the forward uses, or none (then the output is exactly ``Linear4bit``'s). All adapters share the
    layer's dropout."""

    def __init__(
        self,
        weight: NF4Tensor,
        bias: torch.Tensor | None = None,
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
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=lora_dtype, device=self.packed.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=lora_dtype, device=self.packed.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_adapters = nn.ModuleDict()  # adapters other than "default", by name
        self.active_adapter: str | None = "default"

    @classmethod
    def from_linear(cls, module: nn.Linear, blocksize: int = 64, double_quant: bool = True, **lora) -> LoraLinear4bit:
        return cls(quantize_nf4(module.weight.detach(), blocksize, double_quant), module.bias, **lora)

    # -----------------------------------------------------------------------------------------------------------
    # Named adapters

    @property
    def adapter_names(self) -> list[str]:
        """``"default"`` first, then the added adapters in the order they were added."""
        return ["default", *self.lora_adapters.keys()]

    def _unknown(self, name) -> ValueError:
        return ValueError(f"LoraLinear4bit: no adapter named {name!r}; known: {self.adapter_names} "
                          "(or None to disable LoRA)")

    def get_adapter(self, name: str) -> LoraAdapter:
        """The tensors and scale of adapter ``name``."""
        if name == "default":
            return LoraAdapter(self.lora_A, self.lora_B, self.scaling, self.lora_alpha, self.use_rslora)
        if name not in self.lora_adapters:
            raise self._unknown(name)
        a = self.lora_adapters[name]
        return LoraAdapter(a.lora_A, a.lora_B, a.scaling, a.lora_alpha, a.use_rslora)

    def check_new_adapter_name(self, name) -> None:
        """Raises unless ``name`` can be given to ``add_adapter``: a non-empty string without '.', not "default" or
        "none" and not already used."""
        if not isinstance(name, str) or not name or "." in name or name in _RESERVED:
            raise ValueError(f"LoraLinear4bit: adapter name {name!r} is not allowed (a non-empty string without '.', "
                             f"other than {list(_RESERVED)})")
        if name in self.lora_adapters:
            raise ValueError(f"LoraLinear4bit: an adapter named {name!r} exists already (delete_adapter it first)")
        if hasattr(self.lora_adapters, name):  # nn.ModuleDict refuses keys that are its attributes ("keys", ...)
            raise ValueError(f"LoraLinear4bit: adapter name {name!r} is not allowed (an nn.ModuleDict attribute)")

    def add_adapter(
        self,
        name: str,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        *,
        lora_alpha: float | None = None,
        use_rslora: bool = False,
    ) -> None:
        """Stores another adapter, A [r, in_features] and B [out_features, r], copied to the layer's LoRA dtype and
        device; ``scaling`` is its s in y += s (x A^T) B^T. ``lora_alpha`` / ``use_rslora`` record the PEFT settings
        behind ``scaling`` for ``save_peft_adapter`` (default: lora_alpha = scaling * r, no rsLoRA). Does not make
        it active and leaves the NF4 weight alone."""
        self.check_new_adapter_name(name)
        where = f"LoraLinear4bit.add_adapter({name!r})"
        for label, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{where}: {label} must be a 2-D floating-point tensor, got {got}")
        r = lora_A.shape[0]
        if r == 0 or lora_A.shape[1] != self.in_features:
            raise ValueError(f"{where}: lora_A must be [r, {self.in_features}] with r > 0, got {list(lora_A.shape)}")
        if list(lora_B.shape) != [self.out_features, r]:
            raise ValueError(f"{where}: lora_B must be [{self.out_features}, {r}] (r from lora_A), "
                             f"got {list(lora_B.shape)}")
        if not math.isfinite(scaling):
            raise ValueError(f"{where}: scaling must be a finite number, got {scaling}")
        like = {"dtype": self.lora_A.dtype, "device": self.lora_A.device}
        self.lora_adapters[name] = _NamedAdapter(
            lora_A.detach().to(**like, copy=True).contiguous(),
            lora_B.detach().to(**like, copy=True).contiguous(),
            float(scaling),
            float(scaling * r if lora_alpha is None else lora_alpha),
            bool(use_rslora),
        )

    def set_adapter(self, name: str | None) -> None:
        """Makes adapter ``name`` the one the forward applies; ``None`` (or "none") applies none."""
        key = _adapter_key(name)
        if key is not None and key != "default" and key not in self.lora_adapters:
            raise self._unknown(name)
        self.active_adapter = key

    def delete_adapter(self, name: str) -> None:
        """Frees an added adapter. "default" cannot be deleted, nor the active adapter."""
        if name == "default" or name not in self.lora_adapters:
            raise ValueError(f"LoraLinear4bit.delete_adapter: {name!r} is not an added adapter; added: "
                             f"{list(self.lora_adapters.keys())}")
        if name == self.active_adapter:
            raise ValueError(f"LoraLinear4bit.delete_adapter: {name!r} is active; set_adapter another one first")
        del self.lora_adapters[name]

    # -----------------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.active_adapter is None:
            return linear(x, self.weight, bias)  # exactly Linear4bit.forward
        adapter = self.get_adapter(self.active_adapter)
        a, b = adapter.lora_A.to(x.dtype), adapter.lora_B.to(x.dtype)
        xl = self.lora_dropout(x)
        return linear(x, self.weight, bias, a, b, adapter.scaling, None if xl is x else xl)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"
        if self.active_adapter != "default":
            text += f", active_adapter={self.active_adapter!r}"
        return text


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
        p.requires_grad_(pname.endswith(("lora_A", "lora_B")))
    return model


def trainable_parameters_report(model: nn.Module) -> str:
    """PEFT's report line. NF4 weights count at their logical size (out * in), like PEFT counts 4-bit weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Linear4bit):
            total += m.out_features * m.in_features
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


# ---------------------------------------------------------------------------------------------------------------
# Adapters of a whole model, in PEFT's directory format (adapter_config.json + adapter_model.safetensors)

_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PEFT's key = prefix + module path + ".lora_A.weight" / ".lora_B.weight"

# PEFT options that change the forward or add tensors; an adapter that sets any of them is refused by name.
_REFUSED_IF_TRUE = ("use_dora", "use_qalora", "lora_bias", "fan_in_fan_out")
_REFUSED_IF_NON_EMPTY = ("rank_pattern", "alpha_pattern")
_REFUSED_IF_SET = (
    "modules_to_save", "trainable_token_indices", "target_parameters", "layer_replication",
    "alora_invocation_tokens", "arrow_config", "use_bdlora", "kasa_config", "monteclora_config",
)  # (velora_config is accepted: VeLoRA changes only the backward pass, its weights are plain LoRA)


def _lora_layers(model: nn.Module, caller: str) -> list[tuple[str, LoraLinear4bit]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear4bit)]
    if not layers:
        raise ValueError(f"{caller}: the model has no LoraLinear4bit layers "
                         "(convert it with replace_linear_with_qlora)")
    return layers


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Makes adapter ``name`` active in every LoraLinear4bit of ``model``; ``None`` (or "none") disables LoRA, so
    the model computes with its NF4 weights alone. Checks every layer before switching any."""
    layers = _lora_layers(model, "set_active_adapter")
    key = _adapter_key(name)
    if key is not None:
        for module, layer in layers:
            if key not in layer.adapter_names:
                raise ValueError(f"set_active_adapter: LoRA layer {module} has no adapter named {name!r}; it has "
                                 f"{layer.adapter_names} (or None to disable LoRA)")
    for _, layer in layers:
        layer.set_adapter(key)


def _read_peft_config(path: str) -> tuple[int, float, bool]:
    """(r, lora_alpha, use_rslora) of a PEFT LoRA adapter_config.json, refusing options qlora does not implement.
    Missing keys take PEFT's defaults (r 8, lora_alpha 8)."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (a PEFT adapter directory holds {_CONFIG_FILE} and "
                                f"{_WEIGHTS_FILE})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not UTF-8 JSON ({e})") from None
    if not isinstance(cfg, dict):  # bad file content is a ValueError, like every other check here
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")  # noqa: TRY004

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{path}: key '{key}' must be {expected}, got {json.dumps(cfg.get(key))}")

    if cfg.get("peft_type") != "LORA":
        raise bad("peft_type", '"LORA"')
    r = cfg.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise bad("r", "a positive integer")
    lora_alpha = cfg.get("lora_alpha", 8)
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not math.isfinite(lora_alpha):
        raise bad("lora_alpha", "a number")
    use_rslora = cfg.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise bad("use_rslora", "true or false")
    if cfg.get("bias", "none") != "none":
        raise bad("bias", '"none" (qlora trains no biases)')
    for key in _REFUSED_IF_TRUE:
        if cfg.get(key) not in (None, False):
            raise ValueError(f"{path}: key '{key}' is {json.dumps(cfg[key])}, which qlora does not support")
    for key in _REFUSED_IF_NON_EMPTY:
        if cfg.get(key) not in (None, {}):
            raise ValueError(f"{path}: key '{key}' is not empty ({json.dumps(cfg[key])}), which qlora does not "
                             "support (one r and lora_alpha for every layer)")
    for key in _REFUSED_IF_SET:
        if cfg.get(key) not in (None, False, [], {}):
            raise ValueError(f"{path}: key '{key}' is set ({json.dumps(cfg[key])}), which qlora does not support")
    return r, float(lora_alpha), use_rslora


def load_peft_adapter(model: nn.Module, name: str, adapter_dir: str) -> nn.Module:
    """Reads the PEFT LoRA adapter in ``adapter_dir`` and adds it as adapter ``name`` to every LoraLinear4bit of
    ``model`` (not made active: see ``set_active_adapter``). Returns the model.

    Each layer, at module path P of ``model.named_modules()``, takes ``base_model.model.P.lora_A.weight`` [r, in]
    and ``.lora_B.weight`` [out, r]; scaling is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). Every layer
    must find its pair and every tensor must belong to a layer; everything is checked before any layer changes.
    ``name`` "default" overwrites the layers' own (trainable) adapter in place, which must have the same r."""
    config_path = os.path.join(adapter_dir, _CONFIG_FILE)
    weights_path = os.path.join(adapter_dir, _WEIGHTS_FILE)
    layers = _lora_layers(model, "load_peft_adapter")
    r, lora_alpha, use_rslora = _read_peft_config(config_path)
    if not os.path.exists(weights_path):
        legacy = os.path.join(adapter_dir, "adapter_model.bin")
        hint = (f"; {legacy} is a pickle, which qlora never reads (save with safe_serialization=True)"
                if os.path.exists(legacy) else "")
        raise FileNotFoundError(f"{weights_path}: no such file{hint}")
    tensors = safetensors_io.load_file(weights_path)
    scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r

    plan = []
    for module, layer in layers:
        if name == "default":
            if layer.r != r:
                raise ValueError(f"{config_path}: r is {r} but the default adapter of {module} has r {layer.r}; "
                                 "load the adapter under another name")
        else:
            try:
                layer.check_new_adapter_name(name)
            except ValueError as e:
                raise ValueError(f"load_peft_adapter: {module}: {e}") from None
        pair = []
        for part, shape in (("lora_A", [r, layer.in_features]), ("lora_B", [layer.out_features, r])):
            key = f"{_PEFT_PREFIX}{module}.{part}.weight"
            if key not in tensors:
                raise ValueError(f"{weights_path}: no tensor {key} for the LoRA layer {module}")
            t = tensors[key]
            if list(t.shape) != shape:
                raise ValueError(f"{weights_path}: {key} has shape {list(t.shape)} but module {module} expects "
                                 f"{shape} (r {r} from {_CONFIG_FILE})")
            if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"{weights_path}: {key} has dtype {t.dtype}, expected float32, bfloat16 or float16")
            pair.append(t)
        plan.append((layer, *pair))
    used = {f"{_PEFT_PREFIX}{module}.{part}.weight" for module, _ in layers for part in ("lora_A", "lora_B")}
    extra = [key for key in tensors if key not in used]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"{weights_path}: {extra[0]} matches no LoRA layer of the model{more}")

    with torch.no_grad():
        for layer, a, b in plan:
            if name == "default":
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)
                layer.scaling, layer.lora_alpha, layer.use_rslora = scaling, lora_alpha, use_rslora
            else:
                layer.add_adapter(name, a, b, scaling, lora_alpha=lora_alpha, use_rslora=use_rslora)
    return model


def save_peft_adapter(
    model: nn.Module, adapter_dir: str, name: str = "default", base_model_name_or_path: str = ""
) -> None:
    """Writes adapter ``name`` of every LoraLinear4bit of ``model`` to ``adapter_dir`` as PEFT does
    (``PeftModel.from_pretrained`` loads it): adapter_model.safetensors (float32, ``base_model.model.<module
    path>.lora_{A,B}.weight``) and adapter_config.json (PEFT LoraConfig keys, target_modules = the layers' attribute
    names, sorted). Each file is written atomically. All layers must share r, lora_alpha, use_rslora and dropout:
    PEFT's format has one of each."""
    layers = _lora_layers(model, "save_peft_adapter")
    tensors = {}
    settings = None
    for module, layer in layers:
        if name not in layer.adapter_names:
            raise ValueError(f"save_peft_adapter: LoRA layer {module} has no adapter named {name!r}; it has "
                             f"{layer.adapter_names}")
        adapter = layer.get_adapter(name)
        dropout = layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
        mine = {"r": adapter.r, "lora_alpha": adapter.lora_alpha, "use_rslora": adapter.use_rslora,
                "lora_dropout": dropout}
        if settings is None:
            settings, first = mine, module
        elif mine != settings:
            raise ValueError(f"save_peft_adapter: adapter {name!r} of {module} has {mine} but {first} has "
                             f"{settings}; a PEFT adapter has one r, lora_alpha, use_rslora and lora_dropout")
        for part, t in (("lora_A", adapter.lora_A), ("lora_B", adapter.lora_B)):
            tensors[f"{_PEFT_PREFIX}{module}.{part}.weight"] = t.detach().to(torch.float32)
    alpha = settings["lora_alpha"]
    config = {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_bias": False,
        "lora_dropout": settings["lora_dropout"],
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": settings["r"],
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module, _ in layers}),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": settings["use_rslora"],
    }
    os.makedirs(adapter_dir, exist_ok=True)
    safetensors_io.save_file(tensors, os.path.join(adapter_dir, _WEIGHTS_FILE), metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    safetensors_io.write_file_atomically(os.path.join(adapter_dir, _CONFIG_FILE), [text.encode("utf-8")])
