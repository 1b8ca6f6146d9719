"""PSNR/SSIM (Y channel, pyiqa-equivalent) and the OSEDiff metrics-log parser.

The RealSR checks compare against OSEDiff's own pyiqa log (6 decimals printed); they skip
when the shared data set is not beside the repository.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from compress.errors import AdcError
from compress.metrics import list_images, load_image, parse_metrics_log, psnr_y, rgb_to_y, ssim_y
from compress.metrics.psnr_ssim import gaussian_window

REALSR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realsr"
PSNR_TOL = 1e-3   # dB, per image
SSIM_TOL = 1e-4   # per image


@pytest.fixture(scope="module")
def realsr() -> Path:
    if not (REALSR / "osediff_SR_metrics.log").is_file():
        pytest.skip(f"shared RealSR data not found at {REALSR}")
    return REALSR


def _errors_vs_log(root: Path, every: int = 1):
    ref = parse_metrics_log(root / "osediff_SR_metrics.log").set_index("image")
    pairs = list(zip(list_images(root / "osediff_SR"), list_images(root / "HR")))[::every]
    ours = []
    for sr_path, hr_path in pairs:
        sr, hr = load_image(sr_path), load_image(hr_path)
        ours.append((sr_path.name, psnr_y(sr, hr).item(), ssim_y(sr, hr).item()))
    dp = [abs(p - ref.loc[n, "psnr"]) for n, p, _ in ours]
    ds = [abs(s - ref.loc[n, "ssim"]) for n, _, s in ours]
    return ours, max(dp), max(ds)


def test_parse_osediff_log(realsr):
    df = parse_metrics_log(realsr / "osediff_SR_metrics.log")
    assert len(df) == 100 and df["image"].is_unique
    first = df.iloc[0]
    assert first["image"] == "Canon_001_LR4.png"
    assert first["psnr"] == pytest.approx(25.793726) and first["ssim"] == pytest.approx(0.851268)
    assert first["lpips"] == pytest.approx(0.224819) and "runtime" not in df.columns
    means = df.attrs["means"]
    assert means["psnr"] == 25.1511 and means["ssim"] == 0.7341 and means["fid"] == pytest.approx(123.493817)
    assert round(df["psnr"].mean(), 4) == 25.1511 and round(df["ssim"].mean(), 4) == 0.7341


def test_parse_log_rejects_non_log(tmp_path):
    (tmp_path / "x.log").write_text("nothing here\n")
    with pytest.raises(AdcError, match="no per-image"):
        parse_metrics_log(tmp_path / "x.log")
    with pytest.raises(AdcError, match="not found"):
        parse_metrics_log(tmp_path / "missing.log")


def test_realsr_subset_matches_pyiqa_log(realsr):
    """Every 10th image (10 pairs) within the per-image tolerances: fast version of the check below."""
    _, max_dp, max_ds = _errors_vs_log(realsr, every=10)
    assert max_dp < PSNR_TOL and max_ds < SSIM_TOL


@pytest.mark.slow
def test_realsr_all_100_match_pyiqa_log_and_means(realsr):
    ours, max_dp, max_ds = _errors_vs_log(realsr)
    assert len(ours) == 100
    assert max_dp < PSNR_TOL and max_ds < SSIM_TOL
    assert round(float(np.mean([p for _, p, _ in ours])), 4) == 25.1511
    assert round(float(np.mean([s for _, _, s in ours])), 4) == 0.7341


def test_y_channel_is_bt601_studio_swing():
    black, white = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    assert torch.allclose(rgb_to_y(black), torch.full((1, 1, 2, 2), 16 / 255))
    assert torch.allclose(rgb_to_y(white), torch.full((1, 1, 2, 2), 235 / 255))
    green = torch.zeros(1, 3, 1, 1)
    green[:, 1] = 1.0
    assert rgb_to_y(green).item() == pytest.approx((16 + 128.553) / 255, abs=1e-6)


def test_psnr_identical_is_pyiqa_cap_not_inf():
    """pyiqa adds eps=1e-8 to the MSE, so identical images give 10*log10(1e8) = 80 dB."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    p = psnr_y(x, x)
    assert p.shape == (2,) and torch.isfinite(p).all()
    assert torch.allclose(p, torch.full((2,), 80.0, dtype=torch.float64))


def test_psnr_known_perturbation_by_hand():
    """+8/255 on G only, in half of the pixels: dY = 8/255 * 128.553/255 there, MSE = dY^2 / 2."""
    x = torch.full((1, 3, 8, 8), 0.5)
    y = x.clone()
    y[:, 1, :4, :] += 8 / 255
    dy = 8 / 255 * 128.553 / 255
    expected = 10 * math.log10(1 / (dy * dy / 2 + 1e-8))
    assert psnr_y(y, x).item() == pytest.approx(expected, abs=1e-4)
    assert psnr_y(x, y).item() == pytest.approx(expected, abs=1e-4)


def test_ssim_identical_is_one_and_symmetric():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 40, 37, generator=g)
    b = (a + 0.1 * torch.randn(1, 3, 40, 37, generator=g)).clamp(0, 1)
    assert ssim_y(a, a).item() == pytest.approx(1.0, abs=1e-12)
    s_ab, s_ba = ssim_y(a, b).item(), ssim_y(b, a).item()
    assert s_ab == pytest.approx(s_ba, abs=1e-12)
    assert 0.0 < s_ab < 1.0


def _reference_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Direct (non-FFT) SSIM with scipy 'valid' correlation, on rounded Y in [0, 255]."""
    x = (rgb_to_y(a) * 255).round().double()[0, 0].numpy()
    y = (rgb_to_y(b) * 255).round().double()[0, 0].numpy()
    w = gaussian_window().numpy()
    f = lambda t: correlate2d(t, w, mode="valid")  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    cs = np.maximum((2 * cxy + c2) / (vx + vy + c2), 0)
    return float((((2 * mx * my + c1) / (mx * mx + my * my + c1)) * cs).mean())


def test_ssim_matches_direct_convolution_on_odd_sizes():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 3, 23, 31, generator=g)
    b = (a + 0.2 * torch.rand(1, 3, 23, 31, generator=g)).clamp(0, 1)
    assert ssim_y(a, b).item() == pytest.approx(_reference_ssim(a, b), abs=1e-10)


def test_window_is_normalised_gaussian():
    w = gaussian_window()
    assert w.shape == (11, 11) and abs(w.sum().item() - 1) < 1e-7
    assert torch.equal(w, w.T) and w[5, 5] == w.max()


def test_batch_equals_per_image_and_grad_flows():
    g = torch.Generator().manual_seed(3)
    hr = torch.rand(3, 3, 24, 24, generator=g)
    sr = (hr + 0.05 * torch.randn(3, 3, 24, 24, generator=g)).clamp(0, 1).requires_grad_(True)
    s, p = ssim_y(sr, hr), psnr_y(sr, hr)
    for i in range(3):
        assert s[i].item() == pytest.approx(ssim_y(sr[i:i + 1], hr[i:i + 1]).item(), abs=1e-12)
        assert p[i].item() == pytest.approx(psnr_y(sr[i:i + 1], hr[i:i + 1]).item(), abs=1e-9)
    (s.sum() + p.sum()).backward()
    assert sr.grad is not None and torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0


def test_bad_tensors_raise_adcerror():
    with pytest.raises(AdcError, match="shapes differ"):
        psnr_y(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))
    with pytest.raises(AdcError, match="Bx3xHxW"):
        ssim_y(torch.rand(3, 16, 16), torch.rand(3, 16, 16))
    with pytest.raises(AdcError, match="at least 11x11"):
        ssim_y(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_load_image_is_uint8_over_255(tmp_path):
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png")
    assert t.shape == (1, 3, 5, 7) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(AdcError, match="unreadable image"):
        load_image(tmp_path / "bad.png")
