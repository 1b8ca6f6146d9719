"""One image reader for sr, evaluate and training (issue 22, items 4 and 5).

Bit depth, EXIF orientation, alpha, NaN pixels and decompression bombs are handled the same way
on every path; 8-bit RGB stays bit-exact with pyiqa's ``imread2tensor`` so published metrics match.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import compress.sr as sr_cli
from compress.data.images import ImageReadError, decode_image, image_size, read_image
from compress.evaluate import evaluate_folders
from compress.evaluate import main as evaluate_main
from compress.metrics.images import load_image
from compress.sr import _inputs
from compress.sr import main as sr_main

TINY = ["--model", "adcsr", "--size", "tiny", "--device", "cpu"]


def _picture(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth 8-bit RGB picture (a gradient plus mild noise), so PSNR differences mean something."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 200 / w + 20, y * 200 / h + 20, (x + y) * 100 / (h + w) + 60], axis=2)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def _noisy(arr: np.ndarray, seed: int = 1) -> np.ndarray:
    return np.clip(arr.astype(np.int16) + np.random.default_rng(seed).integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)


def _psnr(sr_dir: Path, hr_dir: Path) -> float:
    return float(evaluate_folders(sr_dir, hr_dir, metrics="psnr", log=lambda _: None)["psnr"].mean())


def _bomb_png(path: Path, side: int = 60000) -> Path:
    """A valid-looking PNG whose header claims side x side px (far past Pillow's decompression-bomb limit)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------- evaluate: bit depth, EXIF, bombs


def test_8bit_pixels_stay_exactly_pyiqa_imread2tensor(tmp_path):
    """uint8 / 255 in float32 of PIL's convert("RGB"), bit for bit, for every ordinary mode."""
    rgb = _picture()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    files = {"rgb.png": Image.fromarray(rgb), "rgb.jpg": Image.fromarray(rgb), "l.png": Image.fromarray(rgb[..., 0]),
             "p.png": Image.fromarray(rgb).quantize(64), "rgba.png": Image.fromarray(rgba),
             "la.png": Image.fromarray(rgba[..., [0, 3]], "LA"), "cmyk.jpg": Image.fromarray(rgb).convert("CMYK")}
    for name, im in files.items():
        im.save(tmp_path / name)
        with Image.open(tmp_path / name) as ref:
            want = torch.from_numpy(np.array(ref.convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        assert torch.equal(load_image(tmp_path / name), want), name


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_hr_scores_as_its_8bit_copy(tmp_path, channels):
    """Before: a 16-bit grayscale HR was clipped by convert("RGB") (6.6 dB instead of 28.0)."""
    import cv2

    hr8 = _picture()[..., :channels].squeeze()
    sr = _noisy(np.repeat(hr8[..., None], 3, 2) if channels == 1 else hr8)
    for name in ("sr", "hr8", "hr16"):
        (tmp_path / name).mkdir()
    Image.fromarray(sr).save(tmp_path / "sr" / "a.png")
    Image.fromarray(hr8).save(tmp_path / "hr8" / "a.png")
    hr16 = hr8.astype(np.uint16) * 257  # the same picture at 16 bits
    if channels == 1:
        Image.fromarray(hr16).save(tmp_path / "hr16" / "a.png")  # Pillow: mode I;16
    else:
        cv2.imwrite(str(tmp_path / "hr16" / "a.png"), hr16[..., ::-1])  # 16-bit RGB PNG (Pillow cannot write it)
    p8, p16 = _psnr(tmp_path / "sr", tmp_path / "hr8"), _psnr(tmp_path / "sr", tmp_path / "hr16")
    assert p8 > 25 and abs(p8 - p16) < 0.1, (p8, p16)


def test_exif_rotated_hr_scores_as_the_upright_one(tmp_path):
    """Before: orientation was ignored (a size mismatch, or 12.6 dB instead of 31.3 when square)."""
    upright = _picture(24, 32)
    for name in ("sr", "hr", "hr_exif"):
        (tmp_path / name).mkdir()
    Image.fromarray(_noisy(upright)).save(tmp_path / "sr" / "a.png")
    Image.fromarray(upright).save(tmp_path / "hr" / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the stored pixels are the upright ones turned left
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(tmp_path / "hr_exif" / "a.png", exif=exif)
    assert image_size(tmp_path / "hr_exif" / "a.png") == (32, 24)
    assert np.array_equal(read_image(tmp_path / "hr_exif" / "a.png"), read_image(tmp_path / "hr" / "a.png"))
    p_up, p_exif = _psnr(tmp_path / "sr", tmp_path / "hr"), _psnr(tmp_path / "sr", tmp_path / "hr_exif")
    assert p_up > 25 and abs(p_up - p_exif) < 1e-9


def test_evaluate_oversized_header_is_one_error_line(tmp_path, capsys):
    """Before: Pillow's DecompressionBombError escaped evaluate as a traceback."""
    Image.fromarray(_picture()).save((tmp_path / "sr").mkdir() or tmp_path / "sr" / "a.png")
    _bomb_png(tmp_path / "hr" / "a.png")
    with pytest.raises(ImageReadError, match="too large to decode safely"):
        decode_image(tmp_path / "hr" / "a.png")
    assert evaluate_main(["--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"), "--metrics", "psnr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "a.png: too large" in err[0], err


def test_evaluate_drops_alpha_and_says_so_once(tmp_path):
    rgb = _picture()
    for name in ("sr", "sr_rgba", "hr"):
        (tmp_path / name).mkdir()
    for i in range(2):
        sr = _noisy(rgb, seed=i)
        Image.fromarray(sr).save(tmp_path / "sr" / f"{i}.png")
        Image.fromarray(np.dstack([sr, np.full(rgb.shape[:2], 40 * i, np.uint8)])).save(tmp_path / "sr_rgba" / f"{i}.png")
        Image.fromarray(rgb).save(tmp_path / "hr" / f"{i}.png")
    lines: list[str] = []
    with_alpha = evaluate_folders(tmp_path / "sr_rgba", tmp_path / "hr", metrics="psnr,ssim", log=lines.append)
    plain = evaluate_folders(tmp_path / "sr", tmp_path / "hr", metrics="psnr,ssim", log=lines.append)
    assert [line for line in lines if "alpha" in line] == [with_alpha.attrs["alpha_note"]]
    assert "2 images have an alpha channel" in with_alpha.attrs["alpha_note"] and plain.attrs["alpha_note"] is None
    assert np.array_equal(with_alpha[["psnr", "ssim"]].to_numpy(), plain[["psnr", "ssim"]].to_numpy())


def test_float_tiff_nan_is_refused_by_the_reader(tmp_path):
    arr = np.random.default_rng(0).random((6, 5), dtype=np.float32)
    Image.fromarray(arr).save(tmp_path / "ok.tif")
    assert np.allclose(read_image(tmp_path / "ok.tif")[..., 1], arr)
    arr[2, 3] = np.nan
    Image.fromarray(arr).save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match=r"nan\.tif: non-finite input pixels \(1 NaN"):
        read_image(tmp_path / "nan.tif")


# ----------------------------------------------------------------------------- sr


class _NanOnBright(nn.Module):
    """x4 nearest neighbour that returns NaN for a bright image (in every precision): a broken-output stand-in."""

    scale = 4

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        out = nn.functional.interpolate(x * self.w, scale_factor=4, mode="nearest")
        return out * float("nan") if x.mean() > 0.8 else out


def test_sr_keeps_alpha_as_an_rgba_png(tmp_path, capsys, monkeypatch):
    """The RGB goes through the model, the alpha is upscaled bicubically, band by band (--tile 16: three row bands)."""
    monkeypatch.setattr(sr_cli, "load_sr_model", lambda *a, **kw: _NanOnBright())
    rgb = _picture(40, 28)
    y, x = np.mgrid[0:40, 0:28]
    alpha = ((x * 9 + y * 3) % 256).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save((tmp_path / "lr").mkdir() or tmp_path / "lr" / "a.png")
    assert sr_main([*TINY, "--input", str(tmp_path / "lr"), "--output", str(tmp_path / "sr"),
                    "--tile", "16", "--overlap", "0"]) == 0
    with Image.open(tmp_path / "sr" / "a.png") as im:
        assert im.mode == "RGBA" and im.size == (112, 160)
        out = np.asarray(im)
    assert np.array_equal(out[..., :3], rgb.repeat(4, 0).repeat(4, 1))  # the model's nearest x4, untouched
    want = torch.nn.functional.interpolate(torch.from_numpy(alpha / np.float32(255))[None, None], scale_factor=4,
                                           mode="bicubic", align_corners=False)[0, 0].clamp(0, 1)
    assert np.abs(out[..., 3].astype(int) - (want * 255).round().numpy().astype(int)).max() <= 1
    assert "skipped" not in capsys.readouterr().err


def test_sr_skips_a_non_finite_image_and_goes_on(tmp_path, capsys, monkeypatch):
    """Before: one NaN image stopped the run for every image after it, blaming the weights."""
    monkeypatch.setattr(sr_cli, "load_sr_model", lambda *a, **kw: _NanOnBright())
    src = tmp_path / "lr"
    src.mkdir()
    nan = np.random.default_rng(0).random((12, 10), dtype=np.float32)
    nan[3, 3] = np.nan
    Image.fromarray(nan).save(src / "a_nan.tif")
    Image.fromarray(np.full((12, 10, 3), 250, np.uint8)).save(src / "b_bright.png")
    for name in ("c.png", "d.png"):
        Image.fromarray(_picture(12, 10)).save(src / name)
    assert sr_main([*TINY, "--input", str(src), "--output", str(tmp_path / "sr")]) == 0
    cap = capsys.readouterr()
    skipped = [line for line in cap.err.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 2, cap.err
    assert "a_nan.tif" in skipped[0] and "non-finite input pixels" in skipped[0]
    assert "b_bright.png" in skipped[1] and "non-finite model output" in skipped[1]
    assert sorted(p.name for p in (tmp_path / "sr").iterdir() if not p.name.startswith(".")) == ["c.png", "d.png"]
    assert "done: 2 written, 2 skipped" in cap.out


def test_sr_skips_an_oversized_header(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sr_cli, "load_sr_model", lambda *a, **kw: _NanOnBright())
    _bomb_png(tmp_path / "lr" / "a.png")
    Image.fromarray(_picture(12, 10)).save(tmp_path / "lr" / "b.png")
    assert sr_main([*TINY, "--input", str(tmp_path / "lr"), "--output", str(tmp_path / "sr")]) == 0
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "a.png: too large to decode safely" in skipped[0]
    assert (tmp_path / "sr" / "b.png").is_file()


def test_sr_output_folder_may_be_the_inputs_parent(tmp_path, capsys):
    """Before: ``--input d/lr --output d`` filtered every input out as an 'earlier output' ('no images')."""
    src = tmp_path / "lr"
    src.mkdir()
    Image.fromarray(_picture(12, 10)).save(src / "a.png")
    root, files = _inputs(src, tmp_path, recursive=False)
    assert root == src and [f.name for f in files] == ["a.png"]
    (src / "sr").mkdir()  # an output folder inside the input tree still hides its own files
    Image.fromarray(_picture(12, 10)).save(src / "sr" / "old.png")
    assert [f.name for f in _inputs(src, src / "sr", recursive=True)[1]] == ["a.png"]
    assert sr_main([*TINY, "--input", str(src), "--output", str(tmp_path)]) == 0
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (40, 48)
    assert (src / "a.png").is_file()
