"""8-bit and 32-bit (paged) AdamW, bitsandbytes-compatible, on ``torch.ops.qlora.adamw8bit_step`` /
``adamw32bit_step``.

* ``AdamW8bit`` / ``PagedAdamW8bit``: both moments as 8-bit codes of bitsandbytes' dynamic maps in blocks of 256
  with a float32 absmax per block (2.03 bytes of state per parameter instead of 8); parameters with fewer than
  ``min_8bit_size`` (4096) elements keep float32 moments, as in bitsandbytes.
* ``AdamW32bit`` / ``PagedAdamW32bit`` (alias ``PagedAdamW``): float32 moments (``paged_adamw_32bit``, the QLoRA
  paper's optimizer).

The update follows bitsandbytes' CUDA kernels (Note [AdamW8 update order] in csrc/core/adamw.h): decoupled weight
decay applied after the Adam step; a NaN or infinite gradient element resets that element's moments and leaves its
parameter unchanged (in both variants; bitsandbytes' 32-bit kernel would instead spread the NaN).

Paging: on CUDA, the moments of parameters with at least ``page_min_size`` (100 000) elements live in managed
memory (``torch.ops.qlora.paged_zeros``) and are prefetched to the GPU before each update, so the driver can evict
them to host RAM when the GPU runs short instead of failing; the cost is page migration over PCIe when that
happens (bitsandbytes measures ~50 % of PCIe bandwidth at best) and nothing when it does not. Results are identical
to the non-paged optimizer. On the CPU paging changes nothing.

State: per parameter ``step`` (int) and ``state1``, ``state2`` (uint8 codes or float32 moments), plus ``absmax1``,
``absmax2``, ``qmap1``, ``qmap2`` for 8-bit states: bitsandbytes' key names, so either library can read the other's
optimizer state (bitsandbytes' ``"__bnb_optimizer_quant_state__"`` wrapper is accepted on load). A state dict is
device-agnostic: ``load_state_dict`` copies the values into buffers this optimizer allocates itself (paged or not,
on the parameter's device), so paged and non-paged optimizers load each other's states.
``state_dict_to_tensors`` / ``state_dict_from_tensors`` flatten a state dict into named tensors plus a JSON string,
for safetensors.
"""

from __future__ import annotations

import json
import math

import torch

__all__ = [
    "AdamW8bit",
    "PagedAdamW8bit",
    "AdamW32bit",
    "PagedAdamW32bit",
    "PagedAdamW",
    "state_dict_to_tensors",
    "state_dict_from_tensors",
]

_BNB_WRAPPER = "__bnb_optimizer_quant_state__"
_STATE_8BIT = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")


class _AdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        optim_bits: int,
        is_paged: bool,
        min_8bit_size: int = 4096,
        page_min_size: int = 100_000,
    ):
        name = type(self).__name__
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"{name}: lr must be finite and >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{name}: betas must be two values in [0, 1), got {betas}")
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"{name}: eps must be finite and >= 0, got {eps}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
            raise ValueError(f"{name}: weight_decay must be finite and >= 0, got {weight_decay}")
        if optim_bits not in (8, 32):
            raise ValueError(f"{name}: optim_bits must be 8 or 32, got {optim_bits}")
        self.optim_bits = optim_bits
        self.is_paged = is_paged
        self.min_8bit_size = int(min_8bit_size)
        self.page_min_size = int(page_min_size)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    # ------------------------------------------------------------------------------------------------------------
    # State

    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _is_paged(self, p: torch.Tensor) -> bool:
        return self.is_paged and p.numel() >= self.page_min_size

    def _fresh_state(self, p: torch.Tensor, where: str) -> dict:
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{type(self).__name__}: {where} is {p.dtype}; float32, bfloat16 or float16 expected")
        if not p.is_contiguous():
            raise ValueError(f"{type(self).__name__}: {where} (shape {tuple(p.shape)}) must be contiguous")

        def moments(dtype):
            if self._is_paged(p):
                return torch.ops.qlora.paged_zeros(p, dtype)
            return torch.zeros(p.shape, dtype=dtype, device=p.device)

        if not self._uses_8bit(p):
            return {"step": 0, "state1": moments(torch.float32), "state2": moments(torch.float32)}
        nblocks = -(-p.numel() // 256)
        return {
            "step": 0,
            "state1": moments(torch.uint8),
            "state2": moments(torch.uint8),
            "absmax1": torch.zeros(nblocks, device=p.device),
            "absmax2": torch.zeros(nblocks, device=p.device),
            "qmap1": torch.ops.qlora.dynamic8_code(True).to(p.device),
            "qmap2": torch.ops.qlora.dynamic8_code(False).to(p.device),
        }

    def _where(self, gi: int, pi: int) -> str:
        return f"parameter {pi} of param group {gi}"

    # ------------------------------------------------------------------------------------------------------------
    # Step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__}: {self._where(gi, pi)} has a sparse gradient")
                if g.dtype != p.dtype:
                    raise TypeError(
                        f"{type(self).__name__}: {self._where(gi, pi)} is {p.dtype} but its gradient is {g.dtype}"
                    )
                state = self.state[p]
                if not state:
                    state.update(self._fresh_state(p, self._where(gi, pi)))
                state["step"] += 1
                args = (int(state["step"]), group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
                s1, s2 = state["state1"], state["state2"]
                if self._is_paged(p):
                    torch.ops.qlora.paged_prefetch(s1)
                    torch.ops.qlora.paged_prefetch(s2)
                if s1.dtype == torch.uint8:
                    torch.ops.qlora.adamw8bit_step(
                        p, g.contiguous(), s1, s2, state["absmax1"], state["absmax2"], state["qmap1"], state["qmap2"],
                        *args,
                    )  # fmt: skip
                else:
                    torch.ops.qlora.adamw32bit_step(p, g.contiguous(), s1, s2, *args)
        return loss

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict of this optimizer or of bitsandbytes' (flat or wrapped keys), copying every value into
        buffers allocated here (paged or not), never changing their dtype."""
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        # The base class checks group sizes and restores hyperparameters; states are restored below, because it
        # would cast float32 moments and absmax to the parameter's dtype.
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        params = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for pi, (p, key) in enumerate(zip(group["params"], saved["params"])):
                params[key] = (p, self._where(gi, pi))
        for key, saved in saved_state.items():
            if key not in params:
                raise KeyError(f"{type(self).__name__}.load_state_dict: state for unknown parameter id {key}")
            p, where = params[key]
            saved = dict(saved)
            saved.update(saved.pop(_BNB_WRAPPER, {}))
            fresh = self._fresh_state(p, where)
            for name, buf in fresh.items():
                if name == "step":
                    continue
                if name not in saved:
                    kind = "8-bit" if "absmax1" in fresh else "32-bit"
                    raise KeyError(
                        f"{type(self).__name__}.load_state_dict: {where} has no '{name}' in the saved state; this "
                        f"optimizer keeps {kind} states for it (optim_bits / min_8bit_size differ?)"
                    )
                value = saved[name]
                if value.dtype != buf.dtype or value.numel() != buf.numel():
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: {where} '{name}' is {value.dtype} with "
                        f"{value.numel()} elements, expected {buf.dtype} with {buf.numel()}"
                    )
                buf.copy_(value.reshape(buf.shape))
            fresh["step"] = int(saved["step"])
            self.state[p] = fresh


class AdamW8bit(_AdamW):
    """AdamW with 8-bit blockwise states (bitsandbytes ``AdamW8bit``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, min_8bit_size=4096):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=8, is_paged=False, min_8bit_size=min_8bit_size)


class PagedAdamW8bit(_AdamW):
    """AdamW with 8-bit blockwise states in paged memory (bitsandbytes ``PagedAdamW8bit``, transformers
    ``paged_adamw_8bit``)."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, min_8bit_size=4096,
        page_min_size=100_000,
    ):  # fmt: skip
        super().__init__(
            params, lr, betas, eps, weight_decay, optim_bits=8, is_paged=True, min_8bit_size=min_8bit_size,
            page_min_size=page_min_size,
        )  # fmt: skip


class AdamW32bit(_AdamW):
    """AdamW with float32 states (bitsandbytes ``AdamW32bit``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=32, is_paged=False)


class PagedAdamW32bit(_AdamW):
    """AdamW with float32 states in paged memory (bitsandbytes ``PagedAdamW``, transformers ``paged_adamw_32bit``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, page_min_size=100_000):
        super().__init__(
            params, lr, betas, eps, weight_decay, optim_bits=32, is_paged=True, page_min_size=page_min_size
        )


PagedAdamW = PagedAdamW32bit


# ---------------------------------------------------------------------------------------------------------------------
# safetensors-friendly form


def state_dict_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], str]:
    """Flattens an optimizer state dict into ``{"state.<id>.<key>": tensor}`` (contiguous CPU tensors) and a JSON
    string holding the param groups and every non-tensor value (the ``step`` counts), e.g. for
    ``safetensors.torch.save_file(tensors, path, metadata={"optimizer": meta})``."""
    tensors, scalars = {}, {}
    for pid, st in state_dict["state"].items():
        flat = dict(st)
        flat.update(flat.pop(_BNB_WRAPPER, {}))
        for key, value in flat.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, json.dumps({"param_groups": state_dict["param_groups"], "scalars": scalars})


def state_dict_from_tensors(tensors: dict[str, torch.Tensor], meta: str) -> dict:
    """Inverse of ``state_dict_to_tensors``."""
    info = json.loads(meta)
    state: dict = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in info["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = info["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
