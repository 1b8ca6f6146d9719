"""Real-ESRGAN degradation: determinism, output format, kernels, sampling frequencies, JPEG, config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compress.data.degradation import DegradationConfig, PairPool, RealESRGANDegradation
from compress.data.images import list_images, read_image, to_chw_tensor
from compress.data.jpeg import jpeg_pil, jpeg_torch
from compress.data.kernels import (KERNEL_TYPES, SINC, Draw, KernelSpec, anisotropic_kernel, filter2d, odd_sizes,
                                   pulse_kernel, random_kernel, sinc_kernel)
from compress.errors import AdcError

REALSR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realsr"


def _textured(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth gradients plus mid-frequency texture and edges: a stand-in for a photo."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, 0.5 * (xx + yy)])[None].repeat(b, 1, 1, 1)
    tex = F.interpolate(torch.rand(b, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    edges = ((xx * 7).floor() % 2)[None, None] * 0.2
    return (0.5 * base + 0.4 * tex + edges).clamp(0, 1)


def _realsr_hr(n: int = 1) -> torch.Tensor:
    hr = REALSR / "HR"
    if not hr.is_dir():
        pytest.skip(f"RealSR test set not found at {REALSR}")
    return torch.stack([to_chw_tensor(read_image(p)) for p in list_images(hr)[:n]])


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


# ----------------------------------------------------------------------------- pipeline


def test_same_seed_same_lr_different_seed_differs():
    hr = _textured(3, 96, 96)
    deg = RealESRGANDegradation()
    a = deg(hr, seed=123)
    b = deg(hr, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    assert not torch.equal(a, deg(hr, seed=124))
    state = torch.random.get_rng_state()
    deg(hr, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is never touched


def test_output_shape_range_and_8bit_512():
    hr = _textured(1, 512, 512, seed=1)
    lr = RealESRGANDegradation()(hr, seed=0)
    assert lr.shape == (1, 3, 128, 128) and lr.dtype == torch.float32
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.allclose(lr * 255, torch.round(lr * 255), atol=1e-4)
    assert lr.std() > 0.01  # not a constant image


@pytest.mark.parametrize("seed", range(6))
def test_batched_shapes_and_quantisation(seed):
    hr = _textured(2, 64, 80, seed=seed)
    lr = RealESRGANDegradation()(hr, seed=seed)
    assert lr.shape == (2, 3, 16, 20)
    levels = lr * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4) and lr.min() >= 0 and lr.max() <= 1


def test_lr_resembles_downsampled_hr():
    # The degradation is mild (AdcSR's settings): LR stays close to a clean x4 downscale.
    hr = _textured(4, 128, 128, seed=3)
    ref = F.interpolate(hr, scale_factor=0.25, mode="area")
    for seed in range(3):
        assert _psnr(RealESRGANDegradation()(hr, seed=seed), ref) > 18


def test_pil_backend_runs_and_is_seeded():
    hr = _textured(2, 64, 64, seed=4)
    deg = RealESRGANDegradation(DegradationConfig(jpeg_backend="pil"))
    a, b = deg(hr, seed=9), deg(hr, seed=9)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)


def test_needs_a_generator_or_seed():
    with pytest.raises(TypeError):
        RealESRGANDegradation()(_textured(1, 32, 32))


# ----------------------------------------------------------------------------- kernels


def test_every_kernel_type_sums_to_one_and_has_its_symmetry():
    for kind in KERNEL_TYPES:
        spec = KernelSpec([kind], [1.0], (7, 21), (0.2, 3.0), (0.5, 4.0), (1.0, 2.0), sinc_prob=0.0)
        draw = Draw(torch.Generator().manual_seed(11))
        for _ in range(20):
            k, got = random_kernel(draw, spec)
            assert got == kind and k.shape[0] % 2 == 1 and 7 <= k.shape[0] <= 21
            assert math.isclose(float(k.sum()), 1.0, abs_tol=1e-12) and k.min() >= 0
            assert torch.allclose(k, k.flip(0, 1), atol=1e-15)  # point symmetry: conv == correlation
            if "aniso" not in kind:  # isotropic: symmetric about both axes and the diagonal
                assert torch.allclose(k, k.flip(0), atol=1e-15) and torch.allclose(k, k.T, atol=1e-15)
    for cutoff, size in [(math.pi / 5, 21), (2.0, 13), (math.pi, 7)]:
        k = sinc_kernel(cutoff, size, pad_to=21)
        assert k.shape == (21, 21) and math.isclose(float(k.sum()), 1.0, abs_tol=1e-12)
        assert torch.allclose(k, k.T, atol=1e-15) and torch.allclose(k, k.flip(0), atol=1e-15)
        assert float(k[10, 10]) == float(k.max())


def test_kernel_formulas():
    g1 = torch.exp(-0.5 * (torch.arange(15, dtype=torch.float64) - 7) ** 2 / 1.3 ** 2)
    sep = torch.outer(g1, g1)
    assert torch.allclose(anisotropic_kernel(15, 1.3, 1.3, 0.0), sep / sep.sum(), atol=1e-15)
    gx = torch.exp(-0.5 * (torch.arange(15, dtype=torch.float64) - 7) ** 2 / 2.0 ** 2)
    gy = torch.exp(-0.5 * (torch.arange(15, dtype=torch.float64) - 7) ** 2 / 0.5 ** 2)
    k = torch.outer(gy, gx)  # sigma_x along columns, sigma_y along rows
    assert torch.allclose(anisotropic_kernel(15, 2.0, 0.5, 0.0), k / k.sum(), atol=1e-15)
    # rotating by 90 degrees swaps the axes
    assert torch.allclose(anisotropic_kernel(15, 2.0, 0.5, math.pi / 2), anisotropic_kernel(15, 0.5, 2.0, 0.0),
                          atol=1e-12)
    # beta = 1 generalised Gaussian is the Gaussian
    assert torch.allclose(anisotropic_kernel(11, 1.1, 0.7, 0.3, shape="generalized", beta=1.0),
                          anisotropic_kernel(11, 1.1, 0.7, 0.3), atol=1e-15)


def test_kernel_type_and_size_frequencies_match_config():
    cfg = DegradationConfig()
    deg = RealESRGANDegradation(cfg)
    draw = Draw(torch.Generator().manual_seed(2024))
    n = 3000
    counts: dict[str, int] = {}
    sizes: dict[int, int] = {}
    for _ in range(n):
        k, kind = random_kernel(draw, deg.spec1)
        counts[kind] = counts.get(kind, 0) + 1
        sizes[k.shape[0]] = sizes.get(k.shape[0], 0) + 1
    expected = {SINC: cfg.sinc_prob}
    expected.update({t: (1 - cfg.sinc_prob) * p for t, p in zip(cfg.kernel_list, cfg.kernel_prob)})
    for kind, p in expected.items():
        tol = 4 * math.sqrt(p * (1 - p) / n) + 1e-3
        assert abs(counts.get(kind, 0) / n - p) < tol, (kind, counts.get(kind, 0) / n, p)
    assert sorted(sizes) == odd_sizes((7, 21)) == [7, 9, 11, 13, 15, 17, 19, 21]
    for s in sizes.values():
        assert abs(s / n - 1 / 8) < 4 * math.sqrt((1 / 8) * (7 / 8) / n)


def test_filter2d_matches_per_sample_convolution():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 20, generator=g)
    kernels = torch.rand(3, 7, 7, generator=g)
    out = filter2d(x, kernels)
    for i in range(3):
        xp = F.pad(x[i:i + 1], (3, 3, 3, 3), mode="reflect")
        ref = F.conv2d(xp.transpose(0, 1), kernels[i][None, None]).transpose(0, 1)
        assert torch.allclose(out[i:i + 1], ref, atol=1e-5)
    assert torch.equal(filter2d(x, pulse_kernel(7)[None].float()), x)


# ----------------------------------------------------------------------------- JPEG


def test_torch_jpeg_close_to_pil_on_real_image():
    hr = _realsr_hr(1)
    q = torch.tensor([95.0])
    assert _psnr(jpeg_torch(hr, q), jpeg_pil(hr, q)) > 35
    psnrs = [_psnr(jpeg_torch(hr, torch.tensor([qq])), hr) for qq in (20.0, 50.0, 80.0, 95.0)]
    assert psnrs == sorted(psnrs) and psnrs[0] + 3 < psnrs[-1]
    pil = [_psnr(jpeg_pil(hr, qq), hr) for qq in (20, 50, 80, 95)]
    assert pil == sorted(pil)


def test_torch_jpeg_quality_batched_and_odd_sizes():
    x = _textured(2, 50, 70, seed=5)  # not a multiple of 16: padded internally, cropped back
    out = jpeg_torch(x, torch.tensor([30.0, 95.0]))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert _psnr(out[:1], x[:1]) < _psnr(out[1:], x[1:])
    assert _psnr(jpeg_torch(x, 95.0), jpeg_pil(x, 95)) > 35
    assert torch.equal(jpeg_torch(x[1:], 95.0), out[1:])  # per-sample quality, no cross-talk


def test_differentiable_jpeg_passes_gradients():
    x = _textured(1, 32, 32, seed=6).requires_grad_(True)
    jpeg_torch(x, 50.0, differentiable=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    hard = jpeg_torch(x.detach(), 50.0)
    soft = jpeg_torch(x.detach(), 50.0, differentiable=True)
    assert _psnr(hard, soft) > 40  # same codec, only the rounding surrogate differs


# ----------------------------------------------------------------------------- config


def test_defaults_are_adcsr():
    c = DegradationConfig()
    assert c.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03) and c.kernel_range == c.kernel_range2 == (7, 21)
    assert (c.blur_sigma, c.blur_sigma2, c.betag_range, c.betap_range) == ((0.2, 1.5), (0.2, 1.0), (0.5, 2.0), (1.0, 1.5))
    assert (c.resize_prob, c.resize_range, c.resize_prob2, c.resize_range2) == (
        (0.2, 0.7, 0.1), (0.3, 1.5), (0.3, 0.4, 0.3), (0.6, 1.2))
    assert (c.noise_range, c.poisson_scale_range, c.noise_range2, c.poisson_scale_range2) == (
        (1, 15), (0.05, 2.0), (1, 12), (0.05, 1.0))
    assert (c.jpeg_range, c.jpeg_range2, c.second_blur_prob, c.final_sinc_prob) == ((60, 95), (60, 100), 0.5, 0.8)
    assert (c.sinc_prob, c.sinc_prob2, c.gray_noise_prob, c.gray_noise_prob2, c.scale, c.gt_size) == (
        0.1, 0.1, 0.4, 0.4, 4, 512)
    assert DegradationConfig.from_dict(c.to_dict()) == c


def test_from_dict_accepts_lists_and_overrides():
    c = DegradationConfig.from_dict({"noise_range": [2, 20], "jpeg_backend": "pil", "kernel_range2": [7, 11]})
    assert c.noise_range == (2.0, 20.0) and c.jpeg_backend == "pil" and c.kernel_range2 == (7, 11)


@pytest.mark.parametrize("bad, where", [
    ({"nosie_range": [1, 2]}, "recipe.data.degradation.nosie_range: unknown key"),
    ({"resize_prob": [0.2, 0.7, 0.2]}, "recipe.data.degradation.resize_prob: probabilities must sum to 1"),
    ({"kernel_prob2": [0.5, 0.5]}, "recipe.data.degradation.kernel_prob2: expected 6 probabilities"),
    ({"noise_range": [15, 1]}, "recipe.data.degradation.noise_range: min must not exceed max"),
    ({"jpeg_range2": [60, 101]}, "recipe.data.degradation.jpeg_range2: values must be <= 100"),
    ({"sinc_prob": 1.5}, "recipe.data.degradation.sinc_prob: expected a probability"),
    ({"kernel_range": [6, 21]}, "recipe.data.degradation.kernel_range: kernel sizes must be odd"),
    ({"kernel_list": ["iso", "box", "aniso", "plateau_iso", "plateau_aniso", "generalized_iso"]},
     "recipe.data.degradation.kernel_list: expected kernel types"),
    ({"resize_range": [1.2, 1.5]}, "recipe.data.degradation.resize_range: expected min <= 1 <= max"),
    ({"blur_kernel_size2": 11}, "recipe.data.degradation.blur_kernel_size2: not accepted"),
    ({"gaussian_noise_prob": True}, "recipe.data.degradation.gaussian_noise_prob: expected a number"),
    ({"scale": 2.5}, "recipe.data.degradation.scale: expected an integer"),
    ({"jpeg_backend": "cv2"}, "recipe.data.degradation.jpeg_backend: expected one of"),
])
def test_from_dict_rejects_mistakes_with_key_path(bad, where):
    with pytest.raises(AdcError) as err:
        DegradationConfig.from_dict(bad)
    assert str(err.value).startswith(where) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- pair pool


def test_pair_pool_keeps_pairs_aligned():
    pool = PairPool(size=6)
    g = torch.Generator().manual_seed(0)
    seen = []
    for step in range(6):
        ids = torch.arange(2 * step, 2 * step + 2, dtype=torch.float32)
        hr = ids.view(2, 1, 1, 1).expand(2, 3, 8, 8).clone()
        lr = ids.view(2, 1, 1, 1).expand(2, 3, 2, 2).clone()
        out_lr, out_hr = pool(lr, hr, g)
        assert torch.equal(out_lr[:, :, :1, :1], out_hr[:, :, :1, :1])  # pairs stay together
        seen.append(out_hr[:, 0, 0, 0].tolist())
    assert seen[:3] == [[0, 1], [2, 3], [4, 5]]  # pass-through while filling
    assert set(seen[3]) <= set(range(6))  # once full, a batch leaves with pairs from earlier batches
    with pytest.raises(AdcError, match="multiple of the batch size"):
        PairPool(size=5)(lr, hr, g)


@pytest.mark.parametrize("gaussian", [True, False])
@pytest.mark.parametrize("gray", [True, False])
def test_noise_kinds_strength_and_gray(gaussian, gray):
    x = torch.full((2, 3, 64, 64), 0.5)
    draw = Draw(torch.Generator().manual_seed(1))
    out = RealESRGANDegradation._noise(x, draw, torch.Generator().manual_seed(2), 1.0 if gaussian else 0.0,
                                       (10.0, 10.0), (1.0, 1.0), 1.0 if gray else 0.0)
    noise = out - x
    assert out.min() >= 0 and out.max() <= 1
    channels_equal = torch.equal(noise[:, 0], noise[:, 1]) and torch.equal(noise[:, 1], noise[:, 2])
    assert channels_equal == gray
    if gaussian:
        assert abs(float(noise.std()) - 10 / 255) < 0.1 * 10 / 255  # sigma is on the 0-255 scale
    else:
        # A flat image has one level, so one "photon" per unit: Poisson(0.5) counts, clipped to
        # {0, 1} -> noise of +-0.5 with P(0) = exp(-0.5), std sqrt(p (1 - p)) ~ 0.49.
        p = 1 - math.exp(-0.5)
        assert abs(float(noise.std()) - math.sqrt(p * (1 - p))) < 0.05
