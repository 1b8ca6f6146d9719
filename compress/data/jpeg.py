"""JPEG compression artifacts for degradation: a batched torch codec model and a real codec (PIL).

Why two: the torch model runs on the training device with one quality per sample and can pass
gradients (cubic rounding surrogate); it is what Real-ESRGAN, S3Diff and AdcSR train with
("DiffJPEG"). PIL's libjpeg is the real thing, useful to check the model or to make test data.

The torch model follows DiffJPEG's conventions so that degraded images match AdcSR's training
distribution: full-range BT.601 YCbCr, 4:2:0 chroma by 2x2 averaging and nearest upsampling,
zero padding to a multiple of 16, quantisation tables scaled by the IJG quality rule *without*
libjpeg's integer rounding and [1, 255] clamping, and output not rounded to 8 bits. DiffJPEG also
indexes the standard tables transposed (its table row is the horizontal frequency); that is kept
by default (``transposed_tables=True``) for fidelity; the two tables are nearly symmetric.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ITU-T T.81 Annex K tables, natural order: row = vertical frequency, column = horizontal.
LUMA_TABLE = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
], dtype=torch.float32)
CHROMA_TABLE = torch.full((8, 8), 99.0)
CHROMA_TABLE[:4, :4] = torch.tensor([
    [17, 18, 24, 47],
    [18, 21, 26, 66],
    [24, 26, 56, 99],
    [47, 66, 99, 99],
], dtype=torch.float32)

_RGB_TO_YCC = torch.tensor([
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
], dtype=torch.float32)
_YCC_TO_RGB = torch.tensor([
    [1.0, 0.0, 1.402],
    [1.0, -0.344136, -0.714136],
    [1.0, 1.772, 0.0],
], dtype=torch.float32)


def _dct_matrix() -> torch.Tensor:
    """Orthonormal 2-D 8x8 DCT-II as a 64 x 64 matrix acting on row-major flattened blocks.

    With the 1-D matrix D (coefficients = D @ block @ D.T), the 2-D transform of the flattened
    block is kron(D, D); one GEMM over all blocks is much faster than many tiny 8x8 products.
    """
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * 0.5
    d[0] /= math.sqrt(2.0)
    return torch.kron(d, d).float()


_DCT64 = _dct_matrix()


def quality_to_scale(quality: torch.Tensor) -> torch.Tensor:
    """IJG quality (1..100) -> multiplier of the base tables (50 -> 1, 95 -> 0.1, 10 -> 5).

    Clamped at 1e-4 so that quality 100 (multiplier 0) stays finite and is nearly lossless.
    """
    q = quality.to(torch.float32)
    return torch.where(q < 50, 50.0 / q, 2.0 - q / 50.0).clamp_min(1e-4)


def _round(x: torch.Tensor, differentiable: bool) -> torch.Tensor:
    r = torch.round(x)
    return r + (x - r) ** 3 if differentiable else r


def _blocks(plane: torch.Tensor) -> torch.Tensor:
    """B x H x W -> B x (H/8 * W/8) x 64, each block flattened row-major."""
    b, h, w = plane.shape
    return plane.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(b, -1, 64)


def _unblocks(blocks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b = blocks.shape[0]
    return blocks.reshape(b, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(b, h, w)


def _code_plane(plane: torch.Tensor, table: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """Level shift, DCT, quantise, dequantise, inverse DCT. ``table`` is B x 8 x 8."""
    _, h, w = plane.shape
    k = _DCT64.to(plane.device, plane.dtype)
    coeff = (_blocks(plane) - 128.0) @ k.T
    t = table.reshape(-1, 1, 64)
    coeff = _round(coeff / t, differentiable) * t
    return _unblocks(coeff @ k, h, w) + 128.0


def jpeg_torch(x: torch.Tensor, quality: torch.Tensor | float, *, differentiable: bool = False,
               transposed_tables: bool = True) -> torch.Tensor:
    """Compress and decompress a batch B x 3 x H x W in [0, 1]; ``quality`` is a scalar or (B,).

    Runs on ``x``'s device in float32. ``differentiable=True`` replaces rounding by
    round(v) + (v - round(v))**3 so gradients flow (AdcSR uses hard rounding: False).
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"jpeg_torch expects B x 3 x H x W, got {tuple(x.shape)}")
    b, _, h, w = x.shape
    quality = torch.as_tensor(quality, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
    scale = quality_to_scale(quality)
    luma, chroma = LUMA_TABLE, CHROMA_TABLE
    if transposed_tables:
        luma, chroma = luma.T, chroma.T
    luma = luma.to(x.device)[None] * scale[:, None, None]
    chroma = chroma.to(x.device)[None] * scale[:, None, None]

    ph, pw = (-h) % 16, (-w) % 16
    img = F.pad(x.float() * 255.0, (0, pw, 0, ph), mode="constant", value=0.0)
    ycc = torch.einsum("ij,bjhw->bihw", _RGB_TO_YCC.to(x.device), img)
    ycc = ycc + torch.tensor([0.0, 128.0, 128.0], device=x.device)[None, :, None, None]
    y = _code_plane(ycc[:, 0], luma, differentiable)
    sub = F.avg_pool2d(ycc[:, 1:], kernel_size=2, stride=2)
    cb = _code_plane(sub[:, 0], chroma, differentiable)
    cr = _code_plane(sub[:, 1], chroma, differentiable)
    up = torch.stack([cb, cr], 1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    ycc = torch.cat([y[:, None], up - 128.0], 1)
    rgb = torch.einsum("ij,bjhw->bihw", _YCC_TO_RGB.to(x.device), ycc)
    return (rgb.clamp(0.0, 255.0) / 255.0)[:, :, :h, :w].to(x.dtype)


def jpeg_pil(x: torch.Tensor, quality: torch.Tensor | float, *, subsampling: str = "4:2:0") -> torch.Tensor:
    """Real JPEG round trip through PIL/libjpeg, one image at a time on the CPU.

    Input is rounded to 8 bits, ``quality`` to an integer in [1, 100]; the result returns to
    ``x``'s device and dtype. Not differentiable.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"jpeg_pil expects B x 3 x H x W, got {tuple(x.shape)}")
    b = x.shape[0]
    q = torch.as_tensor(quality, dtype=torch.float64).reshape(-1).expand(b).tolist()
    arrs = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for arr, qi in zip(arrs, q):
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=int(min(100, max(1, round(qi)))),
                                         subsampling=subsampling)
        buf.seek(0)
        with Image.open(buf) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    res = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    return res.to(device=x.device, dtype=x.dtype)


def jpeg(x: torch.Tensor, quality: torch.Tensor | float, backend: str = "torch") -> torch.Tensor:
    """Dispatch to :func:`jpeg_torch` (hard rounding) or :func:`jpeg_pil`."""
    if backend == "torch":
        return jpeg_torch(x, quality)
    if backend == "pil":
        return jpeg_pil(x, quality)
    raise ValueError(f"unknown JPEG backend {backend!r}; expected 'torch' or 'pil'")
