"""The report's image grid: the same detail-rich crop of LR, every method and HR, one row per image."""

import numpy as np
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
