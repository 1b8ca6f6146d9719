"""Reflection padding to the model's size multiple, and reading that multiple off a model.

Why: AdcSR needs LR sides divisible by 16 (x2 unshuffle, then 3 UNet downsamplers) and the
official ``test.py`` does no padding at all. Reflection (not zeros) keeps the statistics of the
border close to the image, so the padded strip that is cropped away afterwards does not drag the
GroupNorm and colour statistics of the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MULTIPLE = 8


def model_pad_multiple(model: nn.Module, default: int = DEFAULT_MULTIPLE) -> int:
    """``model.config.pad_multiple`` (AdcSR: 16), else ``model.pad_multiple``, else ``default``."""
    for owner in (getattr(model, "config", None), model):
        value = getattr(owner, "pad_multiple", None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return default


def _reflect_1d(x: torch.Tensor, dim: int, after: int) -> torch.Tensor:
    """Append ``after`` reflected rows/columns along ``dim`` (-1 or -2), even when ``after`` >= the size.

    ``F.pad(mode="reflect")`` needs pad < size, so a tiny image is reflected repeatedly; a
    1-pixel side has nothing to reflect and is replicated.
    """
    while after > 0:
        size = x.shape[dim]
        step = min(after, size - 1)
        if step == 0:
            pad = (0, after, 0, 0) if dim == -1 else (0, 0, 0, after)
            return F.pad(x, pad, mode="replicate")
        pad = (0, step, 0, 0) if dim == -1 else (0, 0, 0, step)
        x = F.pad(x, pad, mode="reflect")
        after -= step
    return x


def reflect_pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, h, w) on the bottom and right to sides divisible by ``multiple``; return it and (h, w).

    Only bottom/right are padded so that cropping the output back is ``[..., :s*h, :s*w]``.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph:
        x = _reflect_1d(x, -2, ph)
    if pw:
        x = _reflect_1d(x, -1, pw)
    return x, (h, w)


def reflect_pad_to_min(x: torch.Tensor, min_side: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, h, w) on the bottom and right so that both sides are at least ``min_side``; return it and (h, w).

    For graphs that cannot run below a size (a dynamic ``torch.export`` program specialises a
    side of one block away); the output is cropped back to ``scale * (h, w)`` like the multiple padding.
    """
    h, w = x.shape[-2:]
    if h < min_side:
        x = _reflect_1d(x, -2, min_side - h)
    if w < min_side:
        x = _reflect_1d(x, -1, min_side - w)
    return x, (h, w)


def reflect_index(size: int, multiple: int) -> torch.Tensor:
    """Source index of every position of an axis of ``size`` padded by :func:`reflect_pad_to_multiple`.

    ``x.index_select(dim, reflect_index(n, m))`` equals that padding along ``dim`` exactly (the
    same repeated reflection, then replication), without a padded copy of the whole image:
    tiles can be cut straight from the unpadded LR.
    """
    pos = torch.arange(size, dtype=torch.float64).view(1, 1, 1, size)
    return _reflect_1d(pos, -1, (-size) % multiple).view(-1).to(torch.long)
