"""The report's image grid: the same detail-rich crop of LR, every method and HR, one row per image."""

import numpy as np
import pytest
from PIL import Image

from compress.stages.image_grid import detail_window, write_image_grid


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_detail_window_finds_the_textured_patch():
    img = np.full((256, 256, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    img[160:224, 32:96] = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # noise patch, flat elsewhere
    y, x = detail_window(img, 64)
    assert abs(y - 160) <= 16 and abs(x - 32) <= 16


def test_grid_has_one_column_per_method_and_skips_missing_images(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        _png(tmp_path / "LR" / f"{name}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        for folder in ("HR", "bicubic", "student"):
            _png(tmp_path / folder / f"{name}.png", rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    cols = {"bicubic": tmp_path / "bicubic", "student": tmp_path / "student"}
    two = write_image_grid(cols, tmp_path / "LR", tmp_path / "HR", ["a", "b", "missing"], 4, tmp_path / "g2.png", crop=64)
    one = write_image_grid({"student": cols["student"]}, tmp_path / "LR", tmp_path / "HR", ["a"], 4,
                           tmp_path / "g1.png", crop=64)
    w2, h2 = Image.open(two).size
    w1, h1 = Image.open(one).size
    assert w2 > w1 * 1.2 and h2 > h1 * 1.5  # 4 columns x 2 rows vs 3 columns x 1 row
    assert write_image_grid(cols, tmp_path / "LR", tmp_path / "HR", ["missing"], 4, tmp_path / "g0.png") is None
    assert not (tmp_path / "g0.png").exists()


def test_every_method_tile_carries_its_crop_psnr_against_hr(tmp_path, monkeypatch):
    import compress.stages.image_grid as grid
    from compress.metrics import psnr_y

    rng = np.random.default_rng(2)
    hr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    noisy = np.clip(hr.astype(int) + rng.integers(-8, 9, hr.shape), 0, 255).astype(np.uint8)
    import torch

    def t(a):
        return torch.from_numpy(a).permute(2, 0, 1)[None].double() / 255
    assert grid.crop_psnr_y(noisy, hr) == pytest.approx(float(psnr_y(t(noisy), t(hr))[0]), abs=1e-9)
    assert grid.crop_psnr_y(hr, hr) == pytest.approx(80.0)  # pyiqa's eps: identical crops give 80 dB

    for name in ("a", "b"):
        _png(tmp_path / "LR" / f"{name}.png", hr[::4, ::4])
        for folder in ("HR", "bicubic", "student"):
            _png(tmp_path / folder / f"{name}.png", hr if folder == "HR" else noisy)
    calls = []
    real = grid.crop_psnr_y
    monkeypatch.setattr(grid, "crop_psnr_y", lambda sr, ref: calls.append(sr.shape) or real(sr, ref))
    cols = {"bicubic": tmp_path / "bicubic", "student": tmp_path / "student"}
    assert grid.write_image_grid(cols, tmp_path / "LR", tmp_path / "HR", ["a", "b"], 4, tmp_path / "g.png", crop=32)
    assert calls == [(32, 32, 3)] * 4  # 2 rows x 2 methods (LR and HR carry none)
