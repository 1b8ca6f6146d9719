"""fp16 that cannot overflow: find the blocks whose activations leave fp16's range, and run them in fp32.

Why: fp16 tops out at 65504. Pure ``.half()`` AdcSR is reported to turn into NaN on smooth
regions; autocast already keeps GroupNorm/LayerNorm/softmax in fp32, but a convolution output, a
residual sum or a skip tensor above 65504 still becomes ``inf`` in fp16. Which blocks do that
depends on the weights, so it is *measured*: :func:`activation_ranges` runs the model in fp32 on
real images with forward hooks and records, per module, the largest finite |input| and |output|;
:func:`fp32_units` picks the residual-unit-level blocks (a ResNet block, a transformer, an
attention, a down/upsampler, or a top-level layer) where anything inside, going in or coming out
exceeds ``65504 / safety``; :func:`keep_fp32` runs exactly those with autocast disabled and their
inputs cast to fp32. A consumer of an over-range tensor is itself over range on its input, so it
is kept too; what stays in fp16 never sees a value near the limit on the calibration images.
The non-finite fallback of :mod:`compress.inference.engine` remains the safety net for images
that go further than the calibration did.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import AdcError
from ..io import atomic_write_json, read_format_json

__all__ = ["FP16_MAX", "DEFAULT_SAFETY", "UNIT_TYPES", "ModuleRange", "Fp16Policy", "activation_ranges",
           "fp32_units", "residual_units", "keep_fp32", "Fp32Handle", "calibrate", "load_policy"]

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
DEFAULT_SAFETY = 4.0  # blocks above 65504 / 4 = 16376 run in fp32: headroom for brighter/flatter images
# Residual units: their internal sums (x + f(x)) are not modules, so they are kept or not as a whole.
UNIT_TYPES = ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock", "Attention", "Downsample2D",
              "Upsample2D", "CLIPEncoderLayer", "SwinLayer", "BertLayer")
POLICY_FORMAT = "adc-fp16-policy"


@dataclass
class ModuleRange:
    """Largest |value| seen going into and coming out of one module (finite values; ``nonfinite`` counts the rest)."""

    name: str
    kind: str
    in_max: float = 0.0
    out_max: float = 0.0
    calls: int = 0
    nonfinite: int = 0

    @property
    def peak(self) -> float:
        return max(self.in_max, self.out_max)


def _abs_max(tree: Any) -> tuple[float, int]:
    """(max finite |x| over every floating tensor in ``tree``, count of tensors holding inf/NaN)."""
    best, bad = 0.0, 0
    for t in pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            a = t.detach().abs()
            finite = torch.isfinite(a)
            if not bool(finite.all()):
                bad += 1
                a = torch.where(finite, a, torch.zeros((), dtype=a.dtype, device=a.device))
            best = max(best, float(a.max()))
    return best, bad


def activation_ranges(model: nn.Module, inputs: Iterable[torch.Tensor], call=None) -> dict[str, ModuleRange]:
    """Run ``model`` in fp32 (no autocast) on each input and record every module's |input| and |output| maxima.

    ``inputs``: model inputs (LR in [-1, 1], padded to the model's multiple). ``call(model, x)``
    replaces ``model(x)`` when the model needs more arguments. Modules are keyed by their
    ``named_modules`` name ("" is the model itself).
    """
    ranges: dict[str, ModuleRange] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            r = ranges.setdefault(name, ModuleRange(name, type(module).__name__))
            i, bi = _abs_max(args)
            o, bo = _abs_max(output)
            r.in_max, r.out_max = max(r.in_max, i), max(r.out_max, o)
            r.calls += 1
            r.nonfinite += bi + bo
        return record

    for name, m in model.named_modules():
        handles.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            for x in inputs:
                (call or (lambda mdl, t: mdl(t)))(model, x)
    finally:
        for h in handles:
            h.remove()
    return ranges


def residual_units(model: nn.Module) -> list[str]:
    """Unit names: modules of :data:`UNIT_TYPES` not inside another unit, and leaves outside any unit."""
    units: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(u + ".") for u in units):
            continue
        if type(m).__name__ in UNIT_TYPES or not any(True for _ in m.children()):
            units.append(name)
    return units


def fp32_units(model: nn.Module, ranges: dict[str, ModuleRange], safety: float = DEFAULT_SAFETY) -> list[str]:
    """The units to keep in fp32: anything in them, into them or out of them above ``FP16_MAX / safety``."""
    if safety < 1:
        raise AdcError(f"safety {safety}: expected >= 1 (blocks above 65504 / safety stay in fp32)")
    limit = FP16_MAX / safety
    keep = []
    for u in residual_units(model):
        peak = max((r.peak for n, r in ranges.items() if n == u or n.startswith(u + ".")), default=0.0)
        bad = any(r.nonfinite for n, r in ranges.items() if n == u or n.startswith(u + "."))
        if peak > limit or bad:
            keep.append(u)
    return keep


class _Fp32Forward:
    """A module's forward with autocast off and half inputs cast to fp32."""

    def __init__(self, forward):
        self.inner = forward

    def __call__(self, *args, **kwargs):
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device_type = leaves[0].device.type if leaves else "cpu"

        def up(t: Any) -> Any:
            return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t

        args, kwargs = pytree.tree_map(up, (args, kwargs))
        with torch.autocast(device_type, enabled=False):
            return self.inner(*args, **kwargs)


class Fp32Handle:
    """Undo of :func:`keep_fp32` (also a context manager)."""

    def __init__(self, modules: list[tuple[nn.Module, Any]]):
        self._modules = modules

    @property
    def count(self) -> int:
        return len(self._modules)

    def remove(self) -> None:
        for m, old in self._modules:
            if old is None:
                del m.forward  # back to the class's forward
            else:
                m.forward = old
        self._modules = []

    def __enter__(self) -> "Fp32Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def keep_fp32(model: nn.Module, names: Sequence[str]) -> Fp32Handle:
    """Run the named submodules in fp32 (autocast off, half inputs upcast) until ``handle.remove()``.

    Their weights must be fp32 (autocast keeps them so); outputs stay fp32, so a large value
    leaving a kept block meets the next op in fp32 (adds promote; a layer that reads it is kept too).
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise AdcError(f"fp16 policy names {missing[0]!r}, which this model does not have ({len(missing)} unknown); "
                       "was the policy made for another model?")
    done: list[tuple[nn.Module, Any]] = []
    for n in names:
        m = modules[n]
        if isinstance(m.__dict__.get("forward"), _Fp32Forward):
            continue
        old = m.__dict__.get("forward")
        m.forward = _Fp32Forward(m.forward)
        done.append((m, old))
    return Fp32Handle(done)


@dataclass
class Fp16Policy:
    """Which units run in fp32 under fp16 autocast, and the measurement behind it."""

    keep_fp32: list[str]
    safety: float
    limit: float
    images: int
    model: str = ""
    peaks: dict[str, float] | None = None  # the kept units' peak |activation|

    def to_json(self) -> dict[str, Any]:
        return {"format": POLICY_FORMAT, "version": 1, **asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_json())


def load_policy(path: str | os.PathLike) -> Fp16Policy:
    """A policy written by ``python -m compress.deploy.fp16 --policy FILE``."""
    meta = read_format_json(path, POLICY_FORMAT, "python -m compress.deploy.fp16 --policy")
    names = meta.get("keep_fp32")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AdcError(f"{path}: keep_fp32 must be a list of module names")
    return Fp16Policy(names, float(meta.get("safety", DEFAULT_SAFETY)), float(meta.get("limit", FP16_MAX)),
                      int(meta.get("images", 0)), str(meta.get("model", "")), meta.get("peaks"))


def calibrate(model: nn.Module, inputs: Iterable[torch.Tensor], safety: float = DEFAULT_SAFETY,
              name: str = "") -> tuple[Fp16Policy, dict[str, ModuleRange]]:
    """Measure ``model`` on ``inputs`` in fp32 and return the policy (and every module's ranges)."""
    inputs = list(inputs)
    ranges = activation_ranges(model, inputs)
    keep = fp32_units(model, ranges, safety)
    peaks = {u: max((r.peak for n, r in ranges.items() if n == u or n.startswith(u + ".")), default=0.0)
             for u in keep}
    peaks = {u: (p if math.isfinite(p) else float("inf")) for u, p in peaks.items()}
    return Fp16Policy(keep, safety, FP16_MAX / safety, len(inputs), name, peaks), ranges

