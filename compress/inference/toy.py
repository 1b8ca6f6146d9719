"""A conv-only x4 SR model with a small, known receptive field: the ruler for the tiling engine.

Why: in AdcSR every output pixel depends on the whole input (GroupNorm statistics, first-level
self-attention, and 3x3 convs down to 1/16 scale: a receptive field of hundreds of LR px), so
tiled and untiled AdcSR differ by construction, and a random-init AdcSR turns those differences
into noise (measured: injecting the untiled GroupNorm statistics into the tiles only cuts the
mean difference from 0.046 to 0.032). This model has AdcSR's contract (LR [-1,1] -> x4 SR [-1,1],
``config.pad_multiple`` 16, a ``color_fix`` flag applying AdcSR's global colour match, a
stride-2 stage so the downsampling grid must line up) but each output pixel sees at most 9 LR px
away (measured). With an overlap whose dead margin (a quarter of it) exceeds that, tiled == untiled up
to float rounding: any larger difference is a bug in padding, grid, windows or stitching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..zoo.adcsr import match_color


@dataclass(frozen=True)
class LocalSRConfig:
    width: int = 16
    pad_multiple: int = 16


class LocalSR(nn.Module):
    """PixelUnshuffle(2) -> conv -> stride-2 conv -> nearest x2 -> conv -> PixelShuffle(8) (+ nearest x4 skip)."""

    scale = 4

    def __init__(self, config: LocalSRConfig = LocalSRConfig(), color_fix: bool = True):
        super().__init__()
        self.config = config
        self.color_fix = color_fix
        w = config.width
        self.body = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(12, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(w, 3 * 64, 3, padding=1), nn.PixelShuffle(8))

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        sr = self.body(lr) + torch.nn.functional.interpolate(lr, scale_factor=4, mode="nearest")
        return match_color(sr, lr) if self.color_fix else sr
