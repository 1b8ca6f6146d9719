"""Image reading and datasets: modes, 16-bit precision, unreadable files, crops, pairing."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data.datasets import HRCropDataset, PairedFolderDataset, pad_to_min_size
from compress.data.images import ImageReadError, list_images, read_image
from compress.errors import AdcError

REALSR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realsr"


def _save(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _png16(path: Path, arr: np.ndarray, seed: int = 0) -> Path:
    """Write a 16-bit PNG with a random PNG filter type per row, so decoding exercises all five."""
    arr = np.asarray(arr, dtype=">u2")
    h, w = arr.shape[:2]
    ch = 1 if arr.ndim == 2 else arr.shape[2]
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[ch]
    px = np.frombuffer(arr.tobytes(), np.uint8).reshape(h, w, 2 * ch).astype(np.int32)
    padded = np.zeros((h + 1, w + 1, 2 * ch), np.int32)
    padded[1:, 1:] = px
    a, b, c = padded[1:, :-1], padded[:-1, 1:], padded[:-1, :-1]
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    preds = [np.zeros_like(px), a, b, (a + b) >> 1, paeth]
    types = np.random.default_rng(seed).integers(0, 5, h)
    types[:min(5, h)] = [0, 1, 2, 3, 4][:min(5, h)]
    raw = b"".join(bytes([t]) + ((px[r] - preds[t][r]) & 255).astype(np.uint8).tobytes() for r, t in enumerate(types))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------- scanning


def test_list_images_recursive_case_insensitive_sorted(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    rgb = np.zeros((4, 4, 3), np.uint8)
    for name in ["b.PNG", "a.jpg", "sub/c.JpEg", "sub/deeper/d.webp", "sub/e.BMP", "f.tif"]:
        _save(tmp_path / name, rgb)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub" / "g.gif").write_bytes(b"GIF89a")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.jpg", "b.PNG", "f.tif", "sub/c.JpEg", "sub/deeper/d.webp", "sub/e.BMP"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["a.jpg", "b.PNG", "f.tif"]
    with pytest.raises(AdcError, match="not found"):
        list_images(tmp_path / "missing")


# ----------------------------------------------------------------------------- modes


def test_grayscale_rgba_palette_become_rgb(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    x = read_image(_save(tmp_path / "g.png", gray))
    assert x.shape == (6, 8, 3) and x.dtype == np.float32
    assert np.array_equal(x[..., 0], x[..., 2]) and np.allclose(x[..., 1], gray / 255.0)

    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: colour must survive (alpha dropped, not composited)
    x = read_image(_save(tmp_path / "a.png", rgba))
    assert x.shape == (5, 7, 3) and np.allclose(x, rgba[..., :3] / 255.0)

    pal = Image.new("P", (4, 3))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2, 1] * 3)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    x = read_image(tmp_path / "p.png")
    assert x.shape == (3, 4, 3)
    assert np.allclose(x[0, 0], [1, 0, 0]) and np.allclose(x[0, 1], [0, 1, 0]) and np.allclose(x[0, 2], [0, 0, 1])


def test_16bit_gray_keeps_precision(tmp_path):
    vals = np.array([[0, 1, 1000, 65535], [257, 258, 30000, 12345]], dtype=np.uint16)
    im = Image.fromarray(vals)
    assert im.mode.startswith("I;16")
    im.save(tmp_path / "g16.png")
    x = read_image(tmp_path / "g16.png")
    assert x.shape == (2, 4, 3)
    assert np.array_equal(x[..., 0], (vals / 65535.0).astype(np.float32))
    assert x[0, 1, 0] > 0  # value 1 of 65535 would be lost at 8 bits


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_16bit_rgb_png_all_filters_exact(tmp_path, channels):
    arr = np.random.default_rng(channels).integers(0, 65536, (23, 31, channels)).astype(np.uint16)
    x = read_image(_png16(tmp_path / "c16.png", arr))
    want = arr[..., :3] if channels >= 3 else np.repeat(arr[..., :1], 3, axis=2)
    assert x.shape == (23, 31, 3)
    assert np.array_equal(np.round(x.astype(np.float64) * 65535), want)  # Pillow alone keeps only 8 bits


def test_unreadable_files_raise_with_path(tmp_path):
    bad = tmp_path / "fake.png"
    bad.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="fake.png"):
        read_image(bad)
    good = _save(tmp_path / "full.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ImageReadError, match="trunc.png"):
        read_image(truncated)
    with pytest.raises(ImageReadError, match="c16_bad.png"):
        blob = bytearray(_png16(tmp_path / "c16_bad.png", np.ones((4, 4, 3), np.uint16)).read_bytes())
        blob[40] ^= 0xFF  # corrupt a byte: CRC check must catch it
        (tmp_path / "c16_bad.png").write_bytes(bytes(blob))
        read_image(tmp_path / "c16_bad.png")


def test_crop_dataset_skips_unreadable_once_and_counts(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a.png", "c.png"):
        _save(tmp_path / name, rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "d.jpg").write_text("nope")
    ds = HRCropDataset(tmp_path, crop=32, seed=0)
    assert len(ds) == 4
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("adc.data.images")
    logger.addHandler(handler)
    try:
        for _ in range(2):
            for i in range(len(ds)):
                item = ds[i]
                assert item.shape == (3, 32, 32) and 0 <= item.min() and item.max() <= 1
    finally:
        logger.removeHandler(handler)
    assert ds.skipped_count == 2
    lines = [r.getMessage() for r in records]
    assert len(lines) == 2 and all("\n" not in m for m in lines)
    assert any("b.png" in m for m in lines) and any("d.jpg" in m for m in lines)


# ----------------------------------------------------------------------------- crops


def test_small_odd_image_is_reflect_padded_to_crop(tmp_path):
    img = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    _save(tmp_path / "small.png", img)
    _save(tmp_path / "z_big.png", np.zeros((80, 80, 3), np.uint8))  # one image fits: the crop is allowed
    ds = HRCropDataset(tmp_path, crop=64, hflip=False, seed=3)
    out = ds[0]  # small.png (sorted first)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    src = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(out[:, :37, :53], src)            # pad only at the bottom/right, crop at 0
    assert torch.equal(out[:, :37, 53], src[:, :, 51])   # reflect without repeating the edge (REFLECT_101)
    assert torch.equal(out[:, 37, :53], src[:, 35, :])
    tiny = pad_to_min_size(np.arange(6, dtype=np.float32).reshape(2, 3, 1), 9)  # pads larger than the image
    assert tiny.shape == (9, 9, 1)


def test_crop_dataset_is_deterministic_and_epoch_dependent(tmp_path):
    img = np.random.default_rng(3).integers(0, 256, (120, 150, 3), dtype=np.uint8)
    _save(tmp_path / "big.png", img)
    a = HRCropDataset(tmp_path, crop=48, hflip=True, seed=7, length=12)
    b = HRCropDataset(tmp_path, crop=48, hflip=True, seed=7, length=12)
    assert all(torch.equal(a[i], b[i]) for i in range(12))
    a.set_epoch(1)
    assert not all(torch.equal(a[i], b[i]) for i in range(12))
    b.set_epoch(1)
    assert all(torch.equal(a[i], b[i]) for i in range(12))
    # Every crop is a window of the image or of its mirror, and both occur.
    src = img.astype(np.float32) / 255.0
    flips = set()
    for i in range(12):
        crop = a[i].permute(1, 2, 0).numpy()
        hits = [f for f, im in ((False, src), (True, src[:, ::-1])) for t in range(120 - 47) for l in range(150 - 47)
                if im[t, l, 0] == crop[0, 0, 0] and np.array_equal(im[t:t + 48, l:l + 48], crop)]
        assert hits, f"item {i} is not a window of the image"
        flips.add(hits[0])
    assert flips == {False, True}


# ----------------------------------------------------------------------------- pairs


def _pair_dirs(tmp_path: Path, n_lr: int, n_hr: int) -> tuple[Path, Path]:
    lr, hr = tmp_path / "LR", tmp_path / "HR"
    lr.mkdir(), hr.mkdir()
    for i in range(n_lr):
        _save(lr / f"img_{i:02d}.png", np.full((4, 4, 3), i, np.uint8))
    for i in range(n_hr):
        # different names than LR: pairing is by sorted order only
        _save(hr / f"{chr(ord('z') - n_hr + 1 + i)}.png", np.full((16, 16, 3), i, np.uint8))
    return lr, hr


def test_paired_dataset_pairs_by_sorted_order(tmp_path):
    lr, hr = _pair_dirs(tmp_path, 3, 3)
    ds = PairedFolderDataset(lr, hr, scale=4)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert item["name"] == f"img_{i:02d}"
        assert item["lr"].shape == (3, 4, 4) and item["hr"].shape == (3, 16, 16)
        assert torch.all(item["lr"] == i / 255.0) and torch.all(item["hr"] == i / 255.0)
    with pytest.raises(AdcError, match="expected exactly x2"):
        PairedFolderDataset(lr, hr, scale=2)[0]


def test_paired_dataset_errors_are_clear(tmp_path):
    lr, hr = _pair_dirs(tmp_path, 3, 2)
    with pytest.raises(AdcError, match=r"has 3 images but .* has 2") as err:
        PairedFolderDataset(lr, hr)
    assert "\n" not in str(err.value)
    with pytest.raises(AdcError, match="lr_dir .*folder not found"):
        PairedFolderDataset(tmp_path / "nope", hr)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdcError, match="hr_dir .*no images"):
        PairedFolderDataset(lr, tmp_path / "empty")


def test_realsr_pairs():
    if not (REALSR / "LR").is_dir() or not (REALSR / "HR").is_dir():
        pytest.skip(f"RealSR test set not found at {REALSR}")
    ds = PairedFolderDataset(REALSR / "LR", REALSR / "HR", scale=4)
    assert len(ds) == 100
    item = ds[0]
    assert item["lr"].shape == (3, 128, 128) and item["hr"].shape == (3, 512, 512)
    assert item["name"] == ds.hr_paths[0].stem
    assert [p.name for p in ds.lr_paths] == [p.name for p in ds.hr_paths]


def test_a_crop_larger_than_every_training_image_is_refused(tmp_path):
    from compress.data import HRCropDataset
    from compress.errors import AdcError

    from PIL import Image

    for i, side in enumerate((40, 64)):
        Image.new("RGB", (side, side + 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(AdcError, match=r"crop 128 is larger than every image measured \(the largest short side is 64"):
        HRCropDataset(tmp_path, crop=128)
    assert len(HRCropDataset(tmp_path, crop=48)) == 2  # one smaller image is padded, as AdcSR does
