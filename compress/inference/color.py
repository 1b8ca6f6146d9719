"""AdcSR's colour fix with global statistics, computed band by band and applied in place.

Why: AdcSR matches each SR channel's mean and std to the LR's. Done per tile, every tile gets
its own statistics and the image turns patchy; done once on the stitched SR against the whole
LR, it is exactly the untiled model's fix. The statistics are accumulated over row bands
(:class:`ChannelStats`, float64, merged exactly as in Chan et al.), so the fix needs no copy of
the image, and a streamed output never needs the whole image in memory.

Degenerate images, where AdcSR's ``(sr - m) / s * s_ref + m_ref`` gives NaN (it printed a
torch warning and wrote a black PNG for a 1x1 LR), are defined here: when the LR channel has
one pixel (its unbiased std is undefined) or the SR channel is flat (std <= ``FLAT_STD``), only
the mean is matched (``sr - m + m_ref``). Everywhere else the arithmetic is AdcSR's. A flat LR
with a textured SR is not degenerate: AdcSR makes it flat at the LR's colour, and so does this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import AdcError

#: An SR channel with a smaller std (in [-1, 1] units; one 8-bit level is 0.0078) counts as flat.
FLAT_STD = 1e-6
_CHUNK = 1 << 22  # values per channel reduced at once: bounds the float64 temporaries to 32 MB


class ChannelStats:
    """Per-channel count, mean and sum of squared deviations of (C, H, W) bands, in float64."""

    def __init__(self, channels: int):
        self.n = 0
        self.mean = [0.0] * channels
        self.m2 = [0.0] * channels

    def update(self, band: torch.Tensor) -> "ChannelStats":
        """Merge a (C, rows, W) band (any float dtype) into the statistics."""
        if band.dim() != 3 or band.shape[0] != len(self.mean):
            raise ValueError(f"ChannelStats: expected ({len(self.mean)}, rows, W), got {tuple(band.shape)}")
        rows_per_chunk = max(1, _CHUNK // max(1, band.shape[2]))
        for r in range(0, band.shape[1], rows_per_chunk):
            chunk = band[:, r:r + rows_per_chunk]
            nb = chunk.shape[1] * chunk.shape[2]
            if nb == 0:
                continue
            n = self.n + nb
            for c in range(chunk.shape[0]):
                x = chunk[c].to(torch.float64)
                mb = float(x.mean())
                m2b = float((x - mb).square_().sum())
                delta = mb - self.mean[c]
                self.mean[c] += delta * nb / n
                self.m2[c] += m2b + delta * delta * self.n * nb / n
            self.n = n
        return self

    def std(self, c: int) -> float:
        """Unbiased std of channel ``c`` (NaN with fewer than two values), as ``torch.std``."""
        return math.sqrt(self.m2[c] / (self.n - 1)) if self.n > 1 else math.nan


@dataclass(frozen=True)
class ColorMap:
    """The per-channel map of the colour fix: ``(x - mean) / std * ref_std + ref_mean``, or
    ``x - mean + ref_mean`` where ``shift_only`` (a degenerate channel)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    ref_mean: tuple[float, ...]
    ref_std: tuple[float, ...]
    shift_only: tuple[bool, ...]

    @classmethod
    def between(cls, sr: ChannelStats, ref: ChannelStats, where: str = "image") -> "ColorMap":
        chans = range(len(sr.mean))
        std, ref_std = tuple(sr.std(c) for c in chans), tuple(ref.std(c) for c in chans)
        shift_only = tuple(ref.n < 2 or not s > FLAT_STD for s in std)
        cmap = cls(tuple(sr.mean), std, tuple(ref.mean), ref_std, shift_only)
        used = [*cmap.mean, *cmap.ref_mean] + [v for c in chans if not shift_only[c] for v in (std[c], ref_std[c])]
        if not all(math.isfinite(v) for v in used):
            raise AdcError(f"{where}: colour statistics are not finite (SR mean {cmap.mean}, LR mean "
                           f"{cmap.ref_mean}); the model output is broken")
        return cmap

    def apply_(self, band: torch.Tensor) -> torch.Tensor:
        """Map a (C, rows, W) band in place."""
        for c in range(band.shape[0]):
            ch = band[c]
            if self.shift_only[c]:
                ch.sub_(self.mean[c]).add_(self.ref_mean[c])
            else:
                ch.sub_(self.mean[c]).div_(self.std[c]).mul_(self.ref_std[c]).add_(self.ref_mean[c])
        return band


def match_color_(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Give every channel of ``sr`` (B,C,H,W) the mean and unbiased std of ``ref`` (B,C,h,w); in place.

    Same arithmetic as :func:`compress.zoo.adcsr.match_color` (``(sr - m) / s * s_ref + m_ref``),
    one channel at a time, with the degenerate cases of the module docstring defined.
    """
    if sr.dim() != 4 or ref.dim() != 4 or sr.shape[:2] != ref.shape[:2]:
        raise ValueError(f"match_color_: sr {tuple(sr.shape)} and ref {tuple(ref.shape)} must be (B,C,*,*) alike")
    for b in range(sr.shape[0]):
        stats = ChannelStats(sr.shape[1]).update(sr[b])
        ColorMap.between(stats, ChannelStats(ref.shape[1]).update(ref[b])).apply_(sr[b])
    return sr
