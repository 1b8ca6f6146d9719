"""``compress.sr`` and the inference engine under hostile inputs and faults.

Each failure is one ``error:`` line with exit 2, checked before the model loads where it can be;
no partial file is left; no unrelated file is overwritten; degenerate images give finite output;
a streamed PNG has exactly the pixels of :func:`upscale` with memory bounded by the tile row.
"""

from __future__ import annotations

import errno
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import compress.sr as sr_cli
from compress.errors import AdcError
from compress.inference import (BandStitcher, ChannelStats, ColorMap, Stitcher, TileGrid, to_uint8_rows, upscale,
                                upscale_to_png)
from compress.inference.toy import LocalSR
from compress.sr import main

TINY = ["--model", "adcsr", "--size", "tiny", "--device", "cpu"]


class NearestX4(nn.Module):
    """x4 nearest neighbour with AdcSR's contract and colour-fix flag: a free model for engine tests."""

    scale = 4

    def __init__(self, color_fix: bool = True):
        super().__init__()
        self.color_fix = color_fix
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return nn.functional.interpolate(x * self.w, scale_factor=4, mode="nearest")


def _img(path: Path, size=(20, 14), mode="RGB", seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the CLI gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(sr_cli, "load_sr_model", refuse)


# ----------------------------------------------------------------------------- output folder (finding 3)


def test_unusable_output_folder_is_reported_before_the_model_loads(tmp_path, capsys, no_model):
    src = _img(tmp_path / "lr" / "a.png")
    (tmp_path / "file").write_text("not a folder")
    assert main([*TINY, "--input", str(src), "--output", str(tmp_path / "file")]) == 2
    assert "--output" in _one_error_line(capsys) and (tmp_path / "file").read_text() == "not a folder"
    assert main([*TINY, "--input", str(src), "--output", str(tmp_path / "file" / "sub")]) == 2
    assert "file/sub" in _one_error_line(capsys)


def test_unwritable_output_folder_is_reported_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model):
    """Permission bits do not stop root, so the refusal is simulated where the probe file is made."""
    src = _img(tmp_path / "lr" / "a.png")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(sr_cli.tempfile, "mkstemp", denied)
    out = tmp_path / "sr"
    assert main([*TINY, "--input", str(src), "--output", str(out)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: --output {out}: cannot write (Permission denied)")


# ----------------------------------------------------------------------------- collisions (finding 4)


def test_file_input_never_overwrites_a_file_in_its_own_folder(tmp_path, capsys):
    folder = tmp_path / "photos"
    src = _img(folder / "x.jpg")
    unrelated = _img(folder / "x.png", size=(5, 5), seed=1)
    before = unrelated.read_bytes()
    assert main([*TINY, "--input", str(src), "--output", str(folder)]) == 2
    line = _one_error_line(capsys)
    assert "refusing to write" in line and "x.png" in line and "input's folder" in line
    assert unrelated.read_bytes() == before
    unrelated.unlink()  # with no file in the way, writing beside the input is fine
    assert main([*TINY, "--input", str(src), "--output", str(folder)]) == 0
    with Image.open(folder / "x.png") as im:
        assert im.size == (80, 56)


# ----------------------------------------------------------------------------- write faults (finding 2)


def test_disk_full_while_writing_is_one_line_and_keeps_earlier_outputs(tmp_path, capsys, monkeypatch):
    src = tmp_path / "lr"
    for name in ("a.png", "b.png", "c.png"):
        _img(src / name)
    from compress.inference import png

    real_close, calls = png.PngWriter.close, []

    def close(self):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_close(self)

    monkeypatch.setattr(png.PngWriter, "close", close)
    out = tmp_path / "sr"
    assert main([*TINY, "--input", str(src), "--output", str(out)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {out / 'b.png'}: cannot write (No space left on device)")
    assert "1 of 3 images were written" in line
    assert sorted(p.name for p in out.iterdir()) == [".adc-written", "a.png"]  # no partial b.png, no temp file


def test_disk_full_in_the_colour_spill_names_it(tmp_path, monkeypatch):
    from compress.inference import engine

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.tempfile, "TemporaryFile", full)
    with pytest.raises(AdcError, match=r"out\.png: cannot write \(No space left on device\)"):
        upscale_to_png(NearestX4(), torch.rand(3, 16, 16), tmp_path / "out.png", ram_bytes=0)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- degenerate images (finding 5)


def test_a_one_pixel_image_gives_its_colour_not_black_and_no_warning(tmp_path):
    torch.manual_seed(0)
    pixel = torch.tensor([120.0, 60.0, 30.0]) / 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "degrees of freedom <= 0" warning was the symptom
        out = upscale(LocalSR().eval(), pixel[:, None, None].clone())
    assert out.shape == (3, 4, 4) and torch.isfinite(out).all()
    assert (out.mean((1, 2)) - pixel).abs().max() < 0.02  # the mean is matched; the std cannot be


def test_flat_images_and_flat_outputs_are_defined():
    ref = ChannelStats(3).update(torch.rand(3, 8, 8))
    flat_sr = ChannelStats(3).update(torch.full((3, 32, 32), 0.25))
    cmap = ColorMap.between(flat_sr, ref)
    assert cmap.shift_only == (True, True, True)  # a flat SR channel cannot be stretched to the LR's std
    band = torch.full((3, 32, 32), 0.25)
    cmap.apply_(band)
    assert torch.allclose(band.mean((1, 2)), torch.tensor(ref.mean, dtype=torch.float32), atol=1e-6)
    # A flat LR with a textured SR is AdcSR's own case: the output is flat at the LR's colour.
    out = upscale(LocalSR().eval(), torch.full((3, 16, 16), 0.4), clamp=False)
    assert torch.isfinite(out).all() and (out - 0.4).abs().max() < 1e-5
    with pytest.raises(AdcError, match="not finite"):
        ColorMap.between(ChannelStats(3).update(torch.full((3, 4, 4), float("nan"))), ref)


def test_channel_stats_merge_bands_exactly():
    x = torch.randn(3, 37, 29, dtype=torch.float64) * 3 + 1
    stats = ChannelStats(3)
    for rows in (slice(0, 5), slice(5, 6), slice(6, 37)):
        stats.update(x[:, rows])
    std, mean = torch.std_mean(x.reshape(3, -1), dim=1)
    assert np.allclose(stats.mean, mean.numpy(), atol=1e-12) and np.allclose([stats.std(c) for c in range(3)],
                                                                               std.numpy(), atol=1e-12)
    assert np.isnan(ChannelStats(1).update(torch.ones(1, 1, 1)).std(0))


# ----------------------------------------------------------------------------- streaming (finding 6)


def test_reflect_index_is_the_padding_without_the_copy():
    from compress.inference import reflect_index, reflect_pad_to_multiple

    for h, w in ((37, 53), (5, 1), (1, 1), (16, 32), (2, 17)):
        x = torch.rand(1, 3, h, w)
        padded, _ = reflect_pad_to_multiple(x, 16)
        assert torch.equal(x.index_select(2, reflect_index(h, 16)).index_select(3, reflect_index(w, 16)), padded)


def test_band_stitcher_concatenates_to_the_whole_stitcher():
    grid = TileGrid.build(112, 96, 48, 16, 16)  # 3 tile rows x 3 columns, overlapping
    torch.manual_seed(0)
    outs = {box: torch.rand(3, 48 * 4, 48 * 4) for box in grid.boxes}
    whole = Stitcher(grid, 4, 3, "cpu")
    for (y, x), o in outs.items():
        whole.add(y, x, o)
    band = BandStitcher(grid, 4, 3, "cpu", crop=(430, 370))  # crop away part of the padding
    bands = [b.clone() for b in band.stream((y, x, o) for (y, x), o in outs.items())]  # views: copy to keep
    assert len(bands) == len(grid.ys)
    assert torch.equal(torch.cat(bands, dim=1), whole.result()[:, :430, :370])  # bit for bit
    assert band.acc.shape == (3, 48 * 4, 96 * 4)  # one tile row, not the image


@pytest.mark.parametrize("color_fix, ram_bytes", [(True, 0), (True, 1 << 30), (False, 0)])
def test_streamed_png_has_exactly_the_pixels_of_upscale(tmp_path, color_fix, ram_bytes):
    torch.manual_seed(0)
    model = LocalSR(color_fix=color_fix).eval()
    lr = torch.rand(3, 75, 61)
    for tile in (None, 32):
        expected = to_uint8_rows(upscale(model, lr, tile=tile, overlap=16, batch=3))
        shape = upscale_to_png(model, lr, tmp_path / "o.png", tile=tile, overlap=16, batch=3, ram_bytes=ram_bytes)
        assert shape == (300, 244)
        with Image.open(tmp_path / "o.png") as im:
            assert im.mode == "RGB" and np.array_equal(np.asarray(im), expected), tile
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]  # the spill file was unnamed


@pytest.mark.slow
def test_streamed_png_memory_does_not_grow_with_the_image(tmp_path):
    """Peak RSS of a 16x taller image grows by far less than its output; upscale()'s grows by all of it."""
    from compress.profile.latency import peak_memory

    model = NearestX4()
    upscale_to_png(model, torch.rand(3, 32, 32), tmp_path / "warm.png", tile=64)  # imports, zlib, allocator

    def peak(h: int, stream: bool) -> int:
        lr = torch.rand(3, h, 512)
        with peak_memory("cpu") as mem:
            if stream:
                upscale_to_png(model, lr, tmp_path / "o.png", tile=64, overlap=16, ram_bytes=0)
            else:
                upscale(model, lr, tile=64, overlap=16)
        return mem.delta_bytes

    grown = 3 * 4 * (4 * 1024 - 4 * 64) * 4 * 512  # fp32 output bytes added by the taller image: 94 MB
    assert peak(1024, True) - peak(64, True) < 0.25 * grown
    assert peak(1024, False) - peak(64, False) > 0.9 * grown  # the check has teeth


# ----------------------------------------------------------------------------- odd files


def test_odd_image_files_are_read_or_skipped_with_one_line(tmp_path, capsys):
    src = tmp_path / "lr"
    _img(src / "gray.png", mode="L")
    _img(src / "palette.png", mode="P")
    _img(src / "rgba.png", mode="RGBA")
    Image.fromarray((np.random.default_rng(0).integers(0, 65535, (14, 20))).astype(np.uint16)).save(src / "deep.png")
    (src / "empty.png").write_bytes(b"")
    data = (src / "gray.png").read_bytes()
    (src / "cut.png").write_bytes(data[:len(data) // 2])
    out = tmp_path / "sr"
    assert main([*TINY, "--input", str(src), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    skipped = sorted(line.split(":")[1].strip().rsplit("/", 1)[-1] for line in err.splitlines()
                     if line.startswith("skipped:"))
    assert skipped == ["cut.png", "empty.png"]
    assert sorted(p.name for p in out.iterdir()) == [".adc-written", "deep.png", "gray.png", "palette.png", "rgba.png"]
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            assert im.mode == ("RGBA" if p.name == "rgba.png" else "RGB") and im.size == (80, 56)  # alpha kept
