"""AdcSR's colour fix, applied once to a whole stitched image, in place.

Why: AdcSR matches each SR channel's mean and std to the LR's. Done per tile, every tile gets
its own statistics and the image turns patchy; done once on the stitched SR against the whole
LR, it is exactly the untiled model's fix. In place, so an 8000x6000 output needs no second
copy of itself.
"""

from __future__ import annotations

import torch

# A flat SR channel (std 0) would divide by zero; AdcSR's own fix gives NaN there.
_MIN_STD = 1e-8


def match_color_(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Give every channel of ``sr`` (B,C,H,W) the mean and unbiased std of ``ref`` (B,C,h,w); in place.

    Same arithmetic as :func:`compress.zoo.adcsr.match_color` (``(sr - m) / s * s_ref + m_ref``),
    one channel at a time.
    """
    if sr.dim() != 4 or ref.dim() != 4 or sr.shape[:2] != ref.shape[:2]:
        raise ValueError(f"match_color_: sr {tuple(sr.shape)} and ref {tuple(ref.shape)} must be (B,C,*,*) alike")
    for b in range(sr.shape[0]):
        for c in range(sr.shape[1]):
            ch = sr[b, c]
            std, mean = torch.std_mean(ch.float())
            ref_std, ref_mean = torch.std_mean(ref[b, c].float())
            ch.sub_(mean).div_(std.clamp_min(_MIN_STD)).mul_(ref_std).add_(ref_mean)
    return sr
