"""PSNR and SSIM on the Y channel, numerically as pyiqa computes them.

Why: the one-step SR papers (and AdcSR) report ``pyiqa.create_metric('psnr'|'ssim', test_y_channel=True,
color_space='ycbcr')`` (pyiqa 0.1.10 - 0.1.13). Papers compare to those numbers, so the
compressed students must be scored the same way, without making pyiqa a dependency.
Own implementation; the behaviour reproduced is:

* images are float32 in [0, 1] (PIL ``convert('RGB')``, uint8 / 255);
* Y is ITU-R BT.601 "studio swing": ``(16 + 65.481 R + 128.553 G + 24.966 B) / 255``,
  computed in float32 (the input dtype);
* PSNR: Y stays in [0, 1] and is *not* rounded; ``10 log10(1 / (mse + 1e-8))``,
  so identical images score 80 dB, never inf; no border crop;
* SSIM: Y is scaled to [0, 255] and rounded (as MATLAB's uint8), then float64;
  11x11 gaussian window (sigma 1.5, normalised, stored as float32 like pyiqa's),
  'valid' convolution (no padding), C1 = (0.01*255)^2, C2 = (0.03*255)^2, the
  contrast-structure term clipped at 0; no border crop. pyiqa's SSIM has an
  average-pool downsample by ``round(min(H, W) / 256)`` (factor 2 at 512x512) but it
  is off by default (``downsample=False`` in its 'ssim' config), so it is off here too.

Rounding uses a straight-through estimator so that ``ssim_y`` stays differentiable for
training code (the gradient ignores the rounding, as in pyiqa).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import AdcError

#: BT.601 luma weights for RGB in [0, 1] giving Y in [16, 235] (before the /255).
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0
PSNR_EPS = 1e-8
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _check_pair(sr: torch.Tensor, hr: torch.Tensor) -> None:
    if not (torch.is_tensor(sr) and torch.is_tensor(hr)):
        raise AdcError("psnr_y/ssim_y expect torch tensors")
    if sr.ndim != 4 or sr.shape[1] not in (1, 3):
        raise AdcError(f"expected Bx3xHxW (or Bx1xHxW luma) tensors, got shape {tuple(sr.shape)}")
    if sr.shape != hr.shape:
        raise AdcError(f"SR and HR shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW RGB in [0, 1] -> Bx1xHxW BT.601 Y in [16/255, 235/255], same dtype, unrounded.

    A Bx1xHxW input is taken as luma already and returned unchanged.
    """
    if img.shape[1] == 1:
        return img
    if not img.is_floating_point():
        raise AdcError(f"rgb_to_y expects a float tensor in [0, 1], got {img.dtype}")
    w = torch.tensor(_Y_WEIGHTS, dtype=img.dtype, device=img.device).view(3, 1)
    y = torch.matmul(img.permute(0, 2, 3, 1), w).permute(0, 3, 1, 2)
    return (y + _Y_OFFSET) / 255.0


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to integers in the forward pass, identity gradient in the backward pass."""
    return x + (x.round() - x).detach()


def psnr_y(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) on Y of Bx3xHxW tensors in [0, 1]; returns a float64 tensor of shape (B,).

    Matches pyiqa's ``psnr`` with ``test_y_channel=True, color_space='ycbcr'``: Y is not
    rounded and ``eps=1e-8`` is added to the MSE, so identical images give 80 dB.
    Inputs are not clamped (neither are they in pyiqa): clamp network outputs first.
    """
    _check_pair(sr, hr)
    dtype = sr.dtype if sr.is_floating_point() else torch.float32
    ys = rgb_to_y(sr.to(dtype))
    yh = rgb_to_y(hr.to(dtype))
    mse = (ys.double() - yh.double()).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / (mse + PSNR_EPS))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """MATLAB's ``fspecial('gaussian', size, sigma)`` rounded through float32, as pyiqa stores it.

    The float32 rounding matters at the 1e-6 level: the window then sums to 1 - 6e-9, which
    shifts ``E[x^2] - mu^2`` by ~4e-4 on bright flat areas (C2 is only 58.5).
    """
    half = (size - 1) / 2.0
    coords = torch.arange(size, dtype=torch.float64) - half
    g = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2.0 * sigma * sigma))
    g = torch.where(g < torch.finfo(torch.float64).eps * g.max(), torch.zeros_like(g), g)
    return (g / g.sum()).float().double()


def _filter_valid(x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """'valid' 2-D filtering of the last two dims with a symmetric window, through the FFT.

    Circular convolution is exact on the valid region (no wrap-around reaches it); in float64
    it agrees with a direct convolution to ~1e-10 and is ~10x faster than float64 conv2d on CPU.
    """
    h, w = x.shape[-2:]
    k = win.shape[-1]
    spectrum = torch.fft.rfft2(x) * torch.fft.rfft2(win.to(x), s=(h, w))
    return torch.fft.irfft2(spectrum, s=(h, w))[..., k - 1:, k - 1:]


def _ssim_luma255(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of Bx1xHxW float64 luma in [0, 255]: gaussian window, 'valid' filtering, mean over the map."""
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise AdcError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    c1 = (0.01 * 255.0) ** 2
    c2 = (0.03 * 255.0) ** 2
    win = gaussian_window().to(device=x.device)
    b = x.shape[0]
    # The five local moments in one pass: B x 5 x H x W.
    moments = _filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), win)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.unbind(dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = e_xx - mu_xx, e_yy - mu_yy, e_xy - mu_xy
    cs = F.relu((2.0 * cov + c2) / (var_x + var_y + c2))
    ssim_map = (2.0 * mu_xy + c1) / (mu_xx + mu_yy + c1) * cs
    return ssim_map.reshape(b, -1).mean(dim=1)


def ssim_y(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM on Y of Bx3xHxW tensors in [0, 1]; returns a float64 tensor of shape (B,).

    Matches pyiqa's ``ssim`` with ``test_y_channel=True, color_space='ycbcr'`` (Y rounded
    to integers in [0, 255], float64, 11x11 gaussian, valid window, no downsampling).
    """
    _check_pair(sr, hr)
    dtype = sr.dtype if sr.is_floating_point() else torch.float32
    ys = _round_ste(rgb_to_y(sr.to(dtype)) * 255.0).double()
    yh = _round_ste(rgb_to_y(hr.to(dtype)) * 255.0).double()
    return _ssim_luma255(ys, yh)


def psnr_from_mse(mse: float) -> float:
    """pyiqa's PSNR for a given MSE of Y in [0, 1] (with its eps); handy for hand checks."""
    return 10.0 * math.log10(1.0 / (mse + PSNR_EPS))
