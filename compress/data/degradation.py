"""Real-ESRGAN second-order degradation (HR -> LR) with AdcSR's settings, batched and seeded.

Why our own: AdcSR (like the one-step SR models it distils) synthesises its LR inputs on the fly with
basicsr's Real-ESRGAN pipeline. Here it is one torch module that runs on any device, takes all
its randomness from a ``torch.Generator`` (same seed -> bit-identical LR on the same device and
torch build), and is configured by a validated dataclass.

Order of operations (AdcSR ``dataset.py``, ``RealESRGANDegrader.degrade``):
  1. blur with kernel 1 -> random resize (scale factor) -> Gaussian or Poisson noise -> clamp -> JPEG
  2. with ``second_blur_prob`` blur with kernel 2 -> random resize to (H/scale*s, W/scale*s)
     -> Gaussian or Poisson noise
  3. with probability 1/2: resize to (H/scale, W/scale) + final sinc, then clamp + JPEG;
     otherwise clamp + JPEG, then resize + final sinc
  4. clamp and quantise to 8 bits: round(x * 255) / 255.
What is drawn per sample and what per batch follows AdcSR too: kernels, noise strengths,
gray-noise flags and JPEG qualities are per sample; resize factor and mode, the Gaussian-vs-
Poisson choice, the second-blur coin and the final order are per batch (the resize must be, to
keep the batch one tensor; AdcSR's 1200-pair pool, :class:`PairPool`, then mixes batches).

Known quirks kept for fidelity: both blur stages draw kernel sizes from 7..21 (AdcSR's config
lists ``blur_kernel_size2: 11`` but its code never reads it); gray Gaussian noise shares one
spatial pattern across the batch (each sample scales it by its own sigma); the JPEG model is
DiffJPEG's (see :mod:`compress.data.jpeg`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..config import ranged
from ..errors import AdcError
from .jpeg import jpeg_pil, jpeg_torch
from .kernels import (KERNEL_TYPES, Draw, KernelSpec, filter2d, random_final_sinc, random_kernel,
                      stack_kernels, PULSE)

RESIZE_MODES = ("area", "bilinear", "bicubic", "nearest")
JPEG_BACKENDS = ("torch", "pil")
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale, used by basicsr's Poisson noise

# Keys of AdcSR's config.yml that are deliberately not fields here, with the reason.
_REFUSED_KEYS = {
    "blur_kernel_size": "AdcSR's code ignores it (sizes are drawn from 7..21); set kernel_range",
    "blur_kernel_size2": "AdcSR's code ignores it (sizes are drawn from 7..21, not 11); set kernel_range2",
}


@dataclass(frozen=True)
class DegradationConfig:
    """All parameters of the degradation; defaults are AdcSR's ``config.yml`` (= S3Diff's)."""

    scale: int = ranged(4, 1, 16)
    gt_size: int = ranged(512, 16, 8192)  # HR crop size for the dataset; the degradation itself accepts any size
    # first degradation
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    kernel_range: tuple[int, int] = (7, 21)
    blur_sigma: tuple[float, float] = (0.2, 1.5)
    betag_range: tuple[float, float] = (0.5, 2.0)
    betap_range: tuple[float, float] = (1.0, 1.5)
    sinc_prob: float = ranged(0.1, 0, 1)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.3, 1.5)
    gaussian_noise_prob: float = ranged(0.5, 0, 1)
    noise_range: tuple[float, float] = (1.0, 15.0)  # sigma on the 0-255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)
    gray_noise_prob: float = ranged(0.4, 0, 1)
    jpeg_range: tuple[float, float] = (60.0, 95.0)
    # second degradation
    second_blur_prob: float = ranged(0.5, 0, 1)
    kernel_list2: tuple[str, ...] = KERNEL_TYPES
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    kernel_range2: tuple[int, int] = (7, 21)
    blur_sigma2: tuple[float, float] = (0.2, 1.0)
    betag_range2: tuple[float, float] = (0.5, 2.0)
    betap_range2: tuple[float, float] = (1.0, 1.5)
    sinc_prob2: float = ranged(0.1, 0, 1)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.6, 1.2)
    gaussian_noise_prob2: float = ranged(0.5, 0, 1)
    noise_range2: tuple[float, float] = (1.0, 12.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 1.0)
    gray_noise_prob2: float = ranged(0.4, 0, 1)
    jpeg_range2: tuple[float, float] = (60.0, 100.0)
    # final step
    final_sinc_prob: float = ranged(0.8, 0, 1)
    final_kernel_range: tuple[int, int] = (7, 21)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    jpeg_backend: str = "torch"

    def __post_init__(self) -> None:
        for f in fields(self):  # lists (from code or YAML) become tuples: the config stays hashable
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        _check(asdict(self), "DegradationConfig")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, path: str = "recipe.data.degradation") -> "DegradationConfig":
        """Build from a recipe mapping; any mistake raises :class:`AdcError` naming ``path.key``."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise AdcError(f"{path}: expected a mapping of degradation settings, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in d.items():
            if key in _REFUSED_KEYS:
                raise AdcError(f"{path}.{key}: not accepted: {_REFUSED_KEYS[key]}")
            if key not in known:
                raise AdcError(f"{path}.{key}: unknown key; expected one of {', '.join(sorted(known))}")
            values[key] = _coerce(value, getattr(cls, key), f"{path}.{key}")
        merged = {**asdict(cls()), **values}
        _check(merged, path)
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Convert a YAML/JSON value to the type of the field's default, or raise."""
    def number(v: Any, kind: type) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise AdcError(f"{where}: expected a number, got {v!r}")
        if kind is int:
            if float(v) != int(v):
                raise AdcError(f"{where}: expected an integer, got {v!r}")
            return int(v)
        if not math.isfinite(float(v)):
            raise AdcError(f"{where}: expected a finite number, got {v!r}")
        return float(v)

    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise AdcError(f"{where}: expected a list, got {value!r}")
        if default and isinstance(default[0], str):
            if not all(isinstance(v, str) for v in value):
                raise AdcError(f"{where}: expected a list of names, got {value!r}")
            return tuple(value)
        kind = int if default and isinstance(default[0], int) else float
        return tuple(number(v, kind) for v in value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise AdcError(f"{where}: expected a string, got {value!r}")
        return value
    return number(value, type(default))


def _check(c: Mapping[str, Any], path: str) -> None:
    """Cross-field validation; each failure names ``path.key``, the value and what was expected."""
    def fail(key: str, msg: str) -> None:
        raise AdcError(f"{path}.{key}: {msg}, got {list(c[key]) if isinstance(c[key], tuple) else c[key]!r}")

    def prob(key: str) -> None:
        if not 0.0 <= c[key] <= 1.0:
            fail(key, "expected a probability in [0, 1]")

    def probs(key: str, n: int | None = None) -> None:
        v = c[key]
        if n is not None and len(v) != n:
            fail(key, f"expected {n} probabilities")
        if any(not 0.0 <= p <= 1.0 for p in v):
            fail(key, "expected probabilities in [0, 1]")
        if abs(sum(v) - 1.0) > 1e-6:
            fail(key, f"probabilities must sum to 1 (they sum to {sum(v):.6g})")

    def span(key: str, low: float | None = None, high: float | None = None, strict_low: bool = False) -> None:
        v = c[key]
        if len(v) != 2:
            fail(key, "expected a [min, max] pair")
        if v[0] > v[1]:
            fail(key, "min must not exceed max")
        if low is not None and (v[0] < low or (strict_low and v[0] == low)):
            fail(key, f"values must be {'>' if strict_low else '>='} {low}")
        if high is not None and v[1] > high:
            fail(key, f"values must be <= {high}")

    if c["scale"] < 1:
        fail("scale", "expected a positive integer")
    if c["gt_size"] < c["scale"] or c["gt_size"] % c["scale"]:
        fail("gt_size", f"expected a positive multiple of scale={c['scale']}")
    for sfx in ("", "2"):
        kl, kp = f"kernel_list{sfx}", f"kernel_prob{sfx}"
        bad = [k for k in c[kl] if k not in KERNEL_TYPES]
        if not c[kl] or bad:
            fail(kl, f"expected kernel types among {list(KERNEL_TYPES)}")
        probs(kp, len(c[kl]))
        kr = f"kernel_range{sfx}"
        span(kr, low=1)
        if c[kr][0] % 2 == 0 or c[kr][1] % 2 == 0:
            fail(kr, "kernel sizes must be odd")
        span(f"blur_sigma{sfx}", low=0.0, strict_low=True)
        for beta in (f"betag_range{sfx}", f"betap_range{sfx}"):
            span(beta, low=0.0, strict_low=True)
            if not c[beta][0] <= 1.0 <= c[beta][1]:
                fail(beta, "expected min <= 1 <= max (half the betas are drawn below 1, half above)")
        probs(f"resize_prob{sfx}", 3)
        rr = f"resize_range{sfx}"
        span(rr, low=0.0, strict_low=True)
        if not c[rr][0] <= 1.0 <= c[rr][1]:
            fail(rr, "expected min <= 1 <= max (down-scales come from [min, 1], up-scales from [1, max])")
        span(f"noise_range{sfx}", low=0.0)
        span(f"poisson_scale_range{sfx}", low=0.0)
        span(f"jpeg_range{sfx}", low=1.0, high=100.0)
        for p in (f"sinc_prob{sfx}", f"gaussian_noise_prob{sfx}", f"gray_noise_prob{sfx}"):
            prob(p)
    prob("second_blur_prob")
    prob("final_sinc_prob")
    span("final_kernel_range", low=1)
    if c["final_kernel_range"][0] % 2 == 0 or c["final_kernel_range"][1] % 2 == 0:
        fail("final_kernel_range", "kernel sizes must be odd")
    if not c["resize_modes"] or any(m not in RESIZE_MODES for m in c["resize_modes"]):
        fail("resize_modes", f"expected a non-empty list among {list(RESIZE_MODES)}")
    if c["jpeg_backend"] not in JPEG_BACKENDS:
        fail("jpeg_backend", f"expected one of {list(JPEG_BACKENDS)}")


# --------------------------------------------------------------------------- the pipeline


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator for tensor-sized draws on ``device``: ``generator`` itself if it lives there,
    else a fresh one seeded from it (so everything still follows from the caller's seed)."""
    if generator.device.type == device.type and (device.index is None or generator.device.index in (None, device.index)):
        return generator
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator(device=device).manual_seed(seed)


class RealESRGANDegradation:
    """``lr = RealESRGANDegradation(cfg)(hr, generator=g)``: B x 3 x H x W in [0, 1] ->
    B x 3 x H/scale x W/scale in [0, 1], quantised to 8 bits."""

    def __init__(self, cfg: DegradationConfig | None = None):
        self.cfg = cfg if cfg is not None else DegradationConfig()
        c = self.cfg
        self.spec1 = KernelSpec(c.kernel_list, c.kernel_prob, c.kernel_range, c.blur_sigma, c.betag_range,
                                c.betap_range, c.sinc_prob)
        self.spec2 = KernelSpec(c.kernel_list2, c.kernel_prob2, c.kernel_range2, c.blur_sigma2, c.betag_range2,
                                c.betap_range2, c.sinc_prob2)

    def sample_kernels(self, batch: int, draw: Draw) -> dict[str, Any]:
        """Per-sample kernels of both blur stages and the final sinc (float64 CPU tensors)."""
        k1, k2, ks, types = [], [], [], []
        for _ in range(batch):
            a, ta = random_kernel(draw, self.spec1)
            b, tb = random_kernel(draw, self.spec2)
            s, ts = random_final_sinc(draw, self.cfg.final_sinc_prob, self.cfg.final_kernel_range)
            k1.append(a), k2.append(b), ks.append(s), types.append((ta, tb, ts))
        return {"kernel1": k1, "kernel2": k2, "sinc": ks, "types": types}

    @torch.no_grad()
    def __call__(self, hr: torch.Tensor, generator: torch.Generator | None = None, *,
                 seed: int | None = None) -> torch.Tensor:
        if (generator is None) == (seed is None):
            raise TypeError("RealESRGANDegradation needs exactly one of generator= or seed= "
                            "(it never uses the global RNG)")
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed))
        if hr.dim() != 4 or hr.shape[1] != 3:
            raise ValueError(f"expected a B x 3 x H x W batch, got shape {tuple(hr.shape)}")
        c = self.cfg
        b, _, h, w = hr.shape
        if h < c.scale or w < c.scale:
            raise ValueError(f"image {h}x{w} is smaller than the scale factor {c.scale}")
        draw = Draw(generator)
        noise_gen = _device_generator(generator, hr.device)
        dev = hr.device
        x = hr.float()

        kernels = self.sample_kernels(b, draw)
        kernel1 = stack_kernels(kernels["kernel1"], dev)
        kernel2 = stack_kernels(kernels["kernel2"], dev)
        sinc = stack_kernels(kernels["sinc"], dev)
        no_final_sinc = all(t[2] == PULSE for t in kernels["types"])

        # ---- first degradation
        x = filter2d(x, kernel1)
        s1 = self._resize_factor(draw, c.resize_prob, c.resize_range)
        x = self._interpolate(x, draw.choice(c.resize_modes), scale_factor=s1)
        x = self._noise(x, draw, noise_gen, c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range,
                        c.gray_noise_prob)
        x = self._jpeg(x, draw.uniforms(b, *c.jpeg_range))

        # ---- second degradation
        if draw.random() < c.second_blur_prob:
            x = filter2d(x, kernel2)
        s2 = self._resize_factor(draw, c.resize_prob2, c.resize_range2)
        size2 = (max(1, int(h / c.scale * s2)), max(1, int(w / c.scale * s2)))
        x = self._interpolate(x, draw.choice(c.resize_modes), size=size2)
        x = self._noise(x, draw, noise_gen, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2,
                        c.gray_noise_prob2)

        # ---- final: [resize back + sinc] and JPEG, in random order
        out_size = (h // c.scale, w // c.scale)
        if draw.random() < 0.5:
            x = self._interpolate(x, draw.choice(c.resize_modes), size=out_size)
            x = x if no_final_sinc else filter2d(x, sinc)
            x = self._jpeg(x, draw.uniforms(b, *c.jpeg_range2))
        else:
            x = self._jpeg(x, draw.uniforms(b, *c.jpeg_range2))
            x = self._interpolate(x, draw.choice(c.resize_modes), size=out_size)
            x = x if no_final_sinc else filter2d(x, sinc)
        return torch.clamp(torch.round(x * 255.0), 0, 255) / 255.0

    # ------------------------------------------------------------------ steps

    @staticmethod
    def _resize_factor(draw: Draw, probs, span) -> float:
        kind = draw.index(probs)  # 0 up, 1 down, 2 keep
        if kind == 0:
            return draw.uniform(1.0, span[1])
        if kind == 1:
            return draw.uniform(span[0], 1.0)
        return 1.0

    @staticmethod
    def _interpolate(x: torch.Tensor, mode: str, *, size=None, scale_factor=None) -> torch.Tensor:
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, **kwargs)

    def _jpeg(self, x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        # Clamp first: out-of-range values make the codec model ring badly (Real-ESRGAN's note).
        x = x.clamp(0, 1)
        if self.cfg.jpeg_backend == "pil":
            return jpeg_pil(x, quality)
        return jpeg_torch(x, quality.to(x.device))

    @staticmethod
    def _noise(x, draw: Draw, gen: torch.Generator, gaussian_prob, sigma_range, poisson_range, gray_prob):
        """Gaussian (sigma on the 0-255 scale) or Poisson noise, colour or gray per sample, clipped."""
        b = x.shape[0]
        dev = x.device
        gaussian = draw.random() < gaussian_prob
        strength = draw.uniforms(b, *(sigma_range if gaussian else poisson_range)).to(dev, x.dtype)
        gray = (draw.uniforms(b, 0.0, 1.0) < gray_prob).to(dev).view(b, 1, 1, 1)
        if gaussian:
            noise = torch.randn(x.shape, generator=gen, device=dev, dtype=x.dtype)
            if bool(gray.any()):
                # One gray pattern for the whole batch, as basicsr does.
                shared = torch.randn((1, 1) + tuple(x.shape[2:]), generator=gen, device=dev, dtype=x.dtype)
                noise = torch.where(gray, shared.expand_as(noise), noise)
            noise = noise * (strength.view(b, 1, 1, 1) / 255.0)
        else:
            noise = _poisson_noise(x, gen)
            if bool(gray.any()):
                wts = torch.tensor(_GRAY_WEIGHTS, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
                luma = (x * wts).sum(1, keepdim=True)
                noise = torch.where(gray, _poisson_noise(luma, gen).expand_as(noise), noise)
            noise = noise * strength.view(b, 1, 1, 1)
        return torch.clamp(x + noise, 0, 1)


def _poisson_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shot noise of the 8-bit-rounded image: photon count = value * 2^ceil(log2(#distinct levels))."""
    b = x.shape[0]
    q8 = torch.clamp(torch.round(x * 255.0), 0, 255)
    # Distinct 8-bit levels per sample, by one bincount over (sample, level) bins.
    bins = (q8.reshape(b, -1).long() + 256 * torch.arange(b, device=x.device)[:, None]).reshape(-1)
    distinct = (torch.bincount(bins, minlength=256 * b).reshape(b, 256) > 0).sum(1).clamp_min(1)
    vals = torch.exp2(torch.ceil(torch.log2(distinct.double()))).to(x.dtype).view(b, 1, 1, 1)
    q = q8 / 255.0
    return torch.poisson(q * vals, generator=gen) / vals - q


class PairPool:
    """AdcSR's training-pair pool (1200 pairs): batches leave in a random mix of earlier batches.

    Why: one batch shares its resize factor and noise type; drawing outputs from a shuffled pool
    of past pairs restores per-sample diversity. While filling, batches pass through unchanged.
    Randomness comes from the ``generator`` passed to each call.
    """

    def __init__(self, size: int = 1200):
        if size <= 0:
            raise AdcError(f"PairPool size: expected a positive number of pairs, got {size}")
        self.size = int(size)
        self._lr: torch.Tensor | None = None
        self._hr: torch.Tensor | None = None
        self._filled = 0

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, hr: torch.Tensor, generator: torch.Generator):
        b = lr.shape[0]
        if self.size % b:
            raise AdcError(f"PairPool size {self.size} is not a multiple of the batch size {b}")
        if self._lr is None:
            self._lr = lr.new_zeros((self.size,) + tuple(lr.shape[1:]))
            self._hr = hr.new_zeros((self.size,) + tuple(hr.shape[1:]))
        if self._filled < self.size:
            self._lr[self._filled:self._filled + b] = lr
            self._hr[self._filled:self._filled + b] = hr
            self._filled += b
            return lr, hr
        perm = torch.randperm(self.size, generator=generator, device=generator.device).to(self._lr.device)
        self._lr, self._hr = self._lr[perm], self._hr[perm]
        out_lr, out_hr = self._lr[:b].clone(), self._hr[:b].clone()
        self._lr[:b], self._hr[:b] = lr, hr
        return out_lr, out_hr


__all__ = ["DegradationConfig", "RealESRGANDegradation", "PairPool"]
