"""Blur kernels of the Real-ESRGAN degradation model, and per-sample filtering of a batch.

Kernels are computed in float64 on the CPU (they are at most 21 x 21) from parameters drawn with
a caller-supplied ``torch.Generator``; they are then padded to a common size so a whole batch is
filtered by one grouped convolution. All kernel shapes here are point-symmetric, so convolution
and correlation coincide.

Kernel formulas, with Q = [x y] S^-1 [x y]^T, S = R(theta) diag(sx^2, sy^2) R(theta)^T and
(x, y) = (column, row) offsets from the centre:
  gaussian      exp(-Q / 2)
  generalized   exp(-Q^beta / 2)
  plateau       1 / (1 + Q^beta)
  sinc          wc J1(wc r) / (2 pi r), centre wc^2 / (4 pi)   (circular low-pass, cut-off wc)
each normalised to sum 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from scipy import special

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
SINC = "sinc"
PULSE = "pulse"


class Draw:
    """Scalar random draws from one ``torch.Generator`` (no global RNG is ever touched)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def random(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64,
                                device=self.generator.device).item())

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def uniforms(self, n: int, low: float, high: float) -> torch.Tensor:
        u = torch.rand(n, generator=self.generator, dtype=torch.float64, device=self.generator.device).cpu()
        return low + (high - low) * u

    def index(self, probs: Sequence[float]) -> int:
        """Index i with probability probs[i] (probs sum to 1)."""
        u, acc = self.random(), 0.0
        for i, p in enumerate(probs):
            acc += p
            if u < acc:
                return i
        return max(i for i, p in enumerate(probs) if p > 0)  # rounding: u landed past the last edge

    def choice(self, items: Sequence):
        return items[min(int(self.random() * len(items)), len(items) - 1)]


def _offsets(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    row, col = torch.meshgrid(ax, ax, indexing="ij")
    return col, row


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """Q = v^T S^-1 v for every offset v, with S rotated by ``theta``."""
    x, y = _offsets(size)
    c, s = math.cos(theta), math.sin(theta)
    u = c * x + s * y      # coordinate along the rotated first axis
    v = -s * x + c * y     # and along the second
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def anisotropic_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, *, shape: str = "gaussian",
                       beta: float = 1.0) -> torch.Tensor:
    """Normalised ``size`` x ``size`` kernel of ``shape`` gaussian / generalized / plateau (float64)."""
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    if shape == "gaussian":
        k = torch.exp(-0.5 * q)
    elif shape == "generalized":
        k = torch.exp(-0.5 * q ** beta)
    elif shape == "plateau":
        k = 1.0 / (q ** beta + 1.0)
    else:
        raise ValueError(f"unknown kernel shape {shape!r}")
    return k / k.sum()


def sinc_kernel(cutoff: float, size: int, pad_to: int = 0) -> torch.Tensor:
    """Circular low-pass (2-D sinc) kernel with cut-off ``cutoff`` rad/pixel, normalised to sum 1."""
    x, y = _offsets(size)
    r = torch.sqrt(x ** 2 + y ** 2)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    # scipy's J1 is accurate to ~1e-16 here; torch.special.bessel_j1 is off by up to ~1e-8.
    j1 = torch.from_numpy(special.j1((cutoff * safe_r).numpy()))
    k = cutoff * j1 / (2 * math.pi * safe_r)
    k = torch.where(r == 0, torch.full_like(k, cutoff ** 2 / (4 * math.pi)), k)
    k = k / k.sum()
    return pad_kernel(k, pad_to) if pad_to > size else k


def pulse_kernel(size: int) -> torch.Tensor:
    """Identity filter (a single 1 in the centre)."""
    k = torch.zeros(size, size, dtype=torch.float64)
    k[size // 2, size // 2] = 1.0
    return k


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a centred odd kernel to ``size`` x ``size``."""
    p = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (p, p, p, p)) if p > 0 else kernel


def odd_sizes(size_range: Sequence[int]) -> list[int]:
    """Odd kernel sizes in [lo, hi] (AdcSR: 7, 9, ..., 21)."""
    lo, hi = int(size_range[0]), int(size_range[1])
    return [s for s in range(lo, hi + 1) if s % 2 == 1]


@dataclass(frozen=True)
class KernelSpec:
    """Distribution of one blur stage's kernels (one of the two Real-ESRGAN blur stages)."""

    kernel_list: Sequence[str]
    kernel_prob: Sequence[float]
    size_range: Sequence[int]
    sigma: Sequence[float]
    betag: Sequence[float]
    betap: Sequence[float]
    sinc_prob: float


def _beta(draw: Draw, beta_range: Sequence[float]) -> float:
    # Half the draws below 1 (heavier tails / sharper plateau), half above, as in Real-ESRGAN.
    if draw.random() < 0.5:
        return draw.uniform(beta_range[0], 1.0)
    return draw.uniform(1.0, beta_range[1])


def random_kernel(draw: Draw, spec: KernelSpec) -> tuple[torch.Tensor, str]:
    """One random blur kernel (float64, its own odd size) and its type name.

    The size is drawn first, uniformly among the odd sizes; then with ``sinc_prob`` a sinc
    (cut-off U(pi/3, pi) below size 13, U(pi/5, pi) from 13 up), else a type from
    ``kernel_list`` by ``kernel_prob`` with sigma_x, sigma_y ~ U(sigma), theta ~ U(-pi, pi).
    """
    size = draw.choice(odd_sizes(spec.size_range))
    if draw.random() < spec.sinc_prob:
        low = math.pi / 3 if size < 13 else math.pi / 5
        return sinc_kernel(draw.uniform(low, math.pi), size), SINC
    kind = spec.kernel_list[draw.index(spec.kernel_prob)]
    sigma_x = draw.uniform(*spec.sigma)
    if kind.endswith("_iso") or kind == "iso":
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = draw.uniform(*spec.sigma), draw.uniform(-math.pi, math.pi)
    if kind in ("iso", "aniso"):
        return anisotropic_kernel(size, sigma_x, sigma_y, theta, shape="gaussian"), kind
    if kind.startswith("generalized"):
        return anisotropic_kernel(size, sigma_x, sigma_y, theta, shape="generalized",
                                  beta=_beta(draw, spec.betag)), kind
    if kind.startswith("plateau"):
        return anisotropic_kernel(size, sigma_x, sigma_y, theta, shape="plateau",
                                  beta=_beta(draw, spec.betap)), kind
    raise ValueError(f"unknown kernel type {kind!r}; expected one of {KERNEL_TYPES}")


def random_final_sinc(draw: Draw, prob: float, size_range: Sequence[int]) -> tuple[torch.Tensor, str]:
    """The final low-pass: with ``prob`` a sinc (cut-off U(pi/3, pi)), otherwise a pulse."""
    if draw.random() < prob:
        size = draw.choice(odd_sizes(size_range))
        return sinc_kernel(draw.uniform(math.pi / 3, math.pi), size), SINC
    return pulse_kernel(max(odd_sizes(size_range))), PULSE


def stack_kernels(kernels: Sequence[torch.Tensor], device=None) -> torch.Tensor:
    """Pad kernels to the largest size and stack them as B x K x K float32."""
    size = max(k.shape[-1] for k in kernels)
    return torch.stack([pad_kernel(k, size) for k in kernels]).to(device=device, dtype=torch.float32)


def filter2d(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter each image of B x C x H x W with its own kernel (B x K x K, or 1 x K x K for all).

    Borders are reflected (edge pixel not repeated); images too small to reflect fall back to
    edge replication.
    """
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"filter2d needs odd kernels, got {k}x{k}")
    pad = k // 2
    mode = "reflect" if pad < h and pad < w else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    weight = kernels.to(device=x.device, dtype=x.dtype)
    if weight.shape[0] == 1:
        out = F.conv2d(xp.reshape(b * c, 1, h + 2 * pad, w + 2 * pad), weight.reshape(1, 1, k, k))
    else:
        weight = weight.reshape(b, 1, 1, k, k).expand(b, c, 1, k, k).reshape(b * c, 1, k, k)
        out = F.conv2d(xp.reshape(1, b * c, h + 2 * pad, w + 2 * pad), weight, groups=b * c)
    return out.reshape(b, c, h, w)
