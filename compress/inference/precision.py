"""Which precision a tile actually runs in, and what to fall back to when it overflows.

Why: pure ``.half()`` AdcSR is reported to overflow to NaN on smooth regions (GroupNorm and
attention, reference notes 1.4). So lower precision is always *autocast* over fp32 weights:
on CUDA, autocast runs convolutions and matmuls in fp16/bf16 but keeps GroupNorm, LayerNorm
and softmax in fp32. CPU autocast does the same for bf16; fp16 on CPU is slow or unsupported
for convolutions, so it becomes bf16 there, with a notice. A batch that still comes out
non-finite is rerun one step up (fp16 -> bf16 where supported -> fp32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import AdcError

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def parse_dtype(dtype: str | torch.dtype | None) -> str:
    """'fp32' | 'bf16' | 'fp16' from a name or torch dtype (None = fp32)."""
    if dtype is None:
        return "fp32"
    if isinstance(dtype, torch.dtype):
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        if dtype in names:
            return names[dtype]
    elif isinstance(dtype, str):
        name = _ALIASES.get(dtype.lower(), dtype.lower())
        if name in DTYPES:
            return name
    raise AdcError(f"dtype {dtype!r} is not one of fp32, bf16, fp16")


def _bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


@dataclass(frozen=True)
class Precision:
    """How tiles run: ``name`` is what they run in (after any substitution); ``notice`` says why it changed."""

    name: str
    device_type: str
    requested: str
    notice: str | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        dt = self.autocast_dtype
        return torch.autocast(self.device_type, dtype=dt) if dt is not None else contextlib.nullcontext()

    def fallback(self, device: torch.device) -> "Precision | None":
        """The next safer precision after a non-finite output: fp16 -> bf16 (if supported) -> fp32 -> none."""
        if self.name == "fp16" and _bf16_ok(device):
            return Precision("bf16", self.device_type, self.requested)
        if self.name in ("fp16", "bf16"):
            return Precision("fp32", self.device_type, self.requested)
        return None


def resolve_precision(dtype: str | torch.dtype | None, device: str | torch.device) -> Precision:
    """The precision tiles will run in on ``device`` for the requested ``dtype``, with a notice on substitution."""
    name = parse_dtype(dtype)
    dev = torch.device(device)
    if name == "fp32":
        return Precision("fp32", dev.type, name)
    if dev.type == "cpu" and name == "fp16":
        return Precision("bf16", "cpu", name, "notice: fp16 on CPU runs as bf16 autocast "
                                              "(fp16 convolutions are slow or unsupported on CPU)")
    if dev.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
        return Precision("fp16", "cuda", name, f"notice: {torch.cuda.get_device_name(dev)} lacks bf16; "
                                               "running fp16 autocast (non-finite tiles are rerun in fp32)")
    if dev.type not in ("cpu", "cuda"):
        try:
            with torch.autocast(dev.type, dtype=DTYPES[name]):
                pass
        except (RuntimeError, ValueError):
            return Precision("fp32", dev.type, name, f"notice: no {name} autocast on {dev.type}; running fp32")
    return Precision(name, dev.type, name)
