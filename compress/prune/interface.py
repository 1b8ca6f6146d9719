"""Widen an interface convolution: AdcSR's 16-input ``conv_in`` and 342-output ``conv_out``.

AdcSR feeds the UNet a 2x pixel-unshuffled RGB image (12 channels) and takes 256 channels out
for the half decoder's mid-block. It gets there by first widening SD's 4->320 ``conv_in`` to
16 inputs (SD's weight tiled 4x along inputs, bias unchanged) and SD's 320->4 ``conv_out`` to
342 outputs (weight and bias tiled 86x along outputs, then truncated), so that the 0.75 leading
slice lands on 12 and 256 (``int(0.75*16)``, ``int(0.75*342)``). ``mode="repeat"`` does exactly
that; ``mode="zeros"`` pads with zeros instead (the output for the original inputs is unchanged).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ..errors import AdcError
from ._common import (ModuleChange, TransformRecord, count_params, describe, rebuild_conv, rebuild_linear, swap_modules,
                      working_copy)

WidenMode = Literal["repeat", "zeros"]


def _grow(t: torch.Tensor, dim: int, size: int, mode: str) -> torch.Tensor:
    old = t.shape[dim]
    if size == old:
        return t
    if size < old:
        return t.narrow(dim, 0, size)
    if mode == "repeat":
        reps = [1] * t.ndim
        reps[dim] = math.ceil(size / old)
        return t.repeat(*reps).narrow(dim, 0, size)
    shape = list(t.shape)
    shape[dim] = size - old
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def widen_conv(conv: nn.Module, in_channels: int | None = None, out_channels: int | None = None,
               mode: WidenMode = "repeat") -> tuple[nn.Module, TransformRecord]:
    """A new conv (or linear) with more inputs and/or outputs, made from ``conv``'s weights.

    ``repeat``: the weight is tiled along the widened dimension and cut to size; the bias is
    tiled with the outputs and unchanged for inputs (as the official AdcSR code does). A smaller
    size keeps the leading channels.
    ``zeros``: new input/output slices are zero. Returns ``(new_module, record)``.
    """
    if mode not in ("repeat", "zeros"):
        raise AdcError(f"widen_conv mode {mode!r}: expected 'repeat' or 'zeros'")
    if isinstance(conv, nn.Linear):
        old_in, old_out = conv.in_features, conv.out_features
    elif isinstance(conv, nn.modules.conv._ConvNd) and not conv.transposed and conv.groups == 1:
        old_in, old_out = conv.in_channels, conv.out_channels
    else:
        raise AdcError(f"widen_conv: {type(conv).__name__} is not an ungrouped convolution or a linear layer")
    new_in = old_in if in_channels is None else in_channels
    new_out = old_out if out_channels is None else out_channels
    for label, old, new in (("in_channels", old_in, new_in), ("out_channels", old_out, new_out)):
        # "repeat" may also narrow: a tiled weight cut shorter is still the same tiling (AdcSR's
        # conv_out is SD's 4 outputs tiled, whatever width the dense student had before pruning).
        floor = 1 if mode == "repeat" else old
        if not isinstance(new, int) or isinstance(new, bool) or new < floor:
            raise AdcError(f"widen_conv {label}={new!r}: expected an integer >= {floor}"
                           f"{' (zeros mode only widens)' if mode == 'zeros' else ''}")
    with torch.no_grad():
        w = _grow(_grow(conv.weight, 1, new_in, mode), 0, new_out, mode)
        b = None if conv.bias is None else _grow(conv.bias, 0, new_out, mode)
    before = count_params(conv)
    new = rebuild_linear(conv, w, b) if isinstance(conv, nn.Linear) else rebuild_conv(conv, w, b)
    rec = TransformRecord("widen_conv", {"in_channels": new_in, "out_channels": new_out, "mode": mode},
                          before, count_params(new), [ModuleChange("", "resized", describe(conv), describe(new))])
    return new, rec


def widen_module(model: nn.Module, name: str, in_channels: int | None = None, out_channels: int | None = None,
                 mode: WidenMode = "repeat", *, inplace: bool = False) -> tuple[nn.Module, TransformRecord]:
    """:func:`widen_conv` on ``model``'s submodule ``name``, swapped in (replayable by name).

    ``model`` is left unchanged (a copy is edited) unless ``inplace``.
    """
    try:
        model.get_submodule(name)
    except AttributeError:
        raise AdcError(f"widen_module: the model has no module {name!r}") from None
    model = working_copy(model, inplace)
    old = model.get_submodule(name)
    before = count_params(model)
    new, rec = widen_conv(old, in_channels, out_channels, mode)
    swap_modules(model, {old: new})
    change = rec.changes[0]
    change.name = name
    return model, TransformRecord("widen_module", {"name": name, **rec.args}, before, count_params(model), [change])


def presliced_width(target: int, ratio_keep: float) -> int:
    """The width ``W`` to widen to so that the leading slice ``int(W * ratio_keep)`` is ``target``.

    ``presliced_width(12, 0.75) == 16`` (AdcSR's conv_in), ``presliced_width(256, 0.75) == 342``.
    """
    if not 0 < ratio_keep <= 1:
        raise AdcError(f"ratio_keep {ratio_keep!r}: expected a number in (0, 1]")
    w = math.ceil(target / ratio_keep)
    while int(w * ratio_keep) < target:
        w += 1
    while w > 1 and int((w - 1) * ratio_keep) >= target:
        w -= 1
    if int(w * ratio_keep) != target:
        raise AdcError(f"no width slices to exactly {target} channels at ratio_keep={ratio_keep}")
    return w


__all__ = ["widen_conv", "widen_module", "presliced_width"]
