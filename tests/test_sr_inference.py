"""The inference engine: padding and crop, tiled == untiled, global colour, precision fallbacks."""

from pathlib import Path

import pytest
import torch
from torch import nn

from compress.data.images import read_image, to_chw_tensor
from compress.errors import AdcError
from compress.inference import (Stitcher, TileGrid, axis_starts, match_color_, reflect_pad_to_multiple,
                                resolve_precision, upscale)
from compress.inference.toy import LocalSR
from compress.zoo.adcsr import build_adcsr, match_color

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIRS = [REPO / "data/samples/realsr/LR", Path("/work/shared/data/realsr/LR")]


def sample_images() -> list[Path]:
    for d in SAMPLE_DIRS:
        files = sorted(d.glob("*.png")) if d.is_dir() else []
        if files:
            return files
    pytest.skip("no RealSR sample LR images (data/samples/realsr/LR)")


def real_lr(index: int = 0) -> torch.Tensor:
    return to_chw_tensor(read_image(sample_images()[index]))


@pytest.fixture(scope="module")
def tiny_adcsr():
    torch.manual_seed(0)
    return build_adcsr("tiny")


class NoColorAttr(nn.Module):
    """Hides the wrapped model's ``color_fix`` flag, so its per-call colour match runs per tile (the naive way)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


# ----------------------------------------------------------------------------- padding / grid


def test_reflect_pad_reaches_the_multiple_and_reflects():
    x = torch.arange(37 * 53, dtype=torch.float32).reshape(1, 1, 37, 53)
    p, (h, w) = reflect_pad_to_multiple(x, 16)
    assert p.shape[-2:] == (48, 64) and (h, w) == (37, 53)
    assert torch.equal(p[..., :37, :53], x)
    assert torch.equal(p[..., 37, :53], x[..., 35, :])  # reflection, not replication or zeros
    tiny, _ = reflect_pad_to_multiple(torch.rand(1, 3, 5, 1), 16)  # pad larger than the side
    assert tiny.shape[-2:] == (16, 16) and torch.isfinite(tiny).all()


def test_odd_sizes_come_out_exactly_4x_tiled_and_untiled(tiny_adcsr):
    x = real_lr()[:, :37, :53]  # padded to 48x64, then cropped back
    whole = upscale(tiny_adcsr, x)
    assert whole.shape == (3, 148, 212)
    assert torch.isfinite(whole).all() and whole.min() >= 0 and whole.max() <= 1
    assert tiny_adcsr.color_fix is True  # switched off while the model ran, restored after
    torch.manual_seed(0)
    tiled = upscale(LocalSR().eval(), x, tile=32, overlap=16)  # 2 x 3 tiles over the padded 48x64
    assert tiled.shape == (3, 148, 212)


def test_untiled_on_a_multiple_of_16_is_the_model_itself():
    torch.manual_seed(0)
    model = LocalSR().eval()  # has AdcSR's color_fix flag and match_color
    x = real_lr()[:, :64, :48]
    with torch.no_grad():
        direct = ((model(x[None] * 2 - 1) + 1) / 2).clamp(0, 1)[0]
    assert (upscale(model, x) - direct).abs().max() <= 1e-5


def test_grid_is_aligned_and_windows_sum_to_one():
    starts = axis_starts(160, 64, 32, 16)
    assert starts == [0, 32, 64, 96] and all(s % 16 == 0 for s in starts)
    assert axis_starts(48, 64, 32, 16) == [0]
    grid = TileGrid.build(112, 160, 64, 40, 16)
    st = Stitcher(grid, 4, 1, "cpu")
    for y, x in grid.boxes:
        st.add(y, x, torch.full((1, 64 * 4, 64 * 4), 0.7))
    out = st.result()
    assert out.shape == (1, 448, 640) and (out - 0.7).abs().max() < 1e-6
    with pytest.raises(AdcError, match="overlap"):
        TileGrid.build(64, 64, 32, 32, 16)
    with pytest.raises(AdcError, match="stride"):  # no stride that is a multiple of 16 keeps 8 px of overlap
        TileGrid.build(64, 64, 16, 8, 16)


# ----------------------------------------------------------------------------- tiled == untiled


def test_tiled_equals_untiled_on_a_real_image():
    """A model with a bounded receptive field (<= 9 LR px, see compress.inference.toy): the overlap's
    dead margin (overlap/4 = 12 px) covers it, so any difference beyond rounding is an engine bug."""
    torch.manual_seed(0)
    model = LocalSR().eval()
    lr = real_lr()
    for x in (lr, lr[:, :117, :101]):  # a multiple of 16, and an odd size that needs padding
        whole = upscale(model, x, clamp=False)
        tiled = upscale(model, x, tile=96, overlap=48, batch=3, clamp=False)
        assert tiled.shape == whole.shape == (3, 4 * x.shape[1], 4 * x.shape[2])
        assert (tiled - whole).abs().max() <= 1e-4  # far inside the required 1/255
    # The check has teeth: an overlap whose dead margin (4 px) is inside the receptive field differs.
    thin = upscale(model, lr, tile=64, overlap=16, clamp=False)
    assert (thin - upscale(model, lr, clamp=False)).abs().max() > 1e-3


def test_colour_statistics_are_global_not_per_tile():
    torch.manual_seed(0)
    model = LocalSR().eval()
    with torch.no_grad():  # raw colours far from the LR's, as an untrained or colour-shifted model gives
        model.body[-2].weight.mul_(10)
        model.body[-2].bias.mul_(10)
    lr = real_lr()
    whole = upscale(model, lr, clamp=False)
    ours = upscale(model, lr, tile=64, overlap=32, clamp=False)
    naive = upscale(NoColorAttr(model), lr, tile=64, overlap=32, color_fix=False, clamp=False)
    assert (ours - whole).abs().max() <= 1 / 255
    assert (naive - whole).abs().max() > 10 / 255  # per-tile statistics: visibly patchy
    # One match over the whole image: the SR has exactly the LR's per-channel mean and std.
    assert torch.allclose(ours.mean((1, 2)), lr.mean((1, 2)), atol=1e-4)
    assert torch.allclose(ours.std((1, 2)), lr.std((1, 2)), atol=1e-4)


def test_in_place_colour_match_is_adcsr_match_color():
    sr, ref = torch.randn(2, 3, 40, 24) * 3 + 1, torch.rand(2, 3, 10, 6)
    expected = match_color(sr, ref)
    assert (match_color_(sr.clone(), ref) - expected).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- precision


def test_half_precision_is_finite_on_sample_images(tiny_adcsr):
    x = real_lr()[:, 40:88, 40:72]  # 48x32: two 32x32 tiles
    notices: list[str] = []
    for dtype, tile in (("fp16", 32), ("bf16", None)):
        out = upscale(tiny_adcsr, x, tile=tile, overlap=16, dtype=dtype, log=notices.append)
        assert out.shape == (3, 192, 128) and torch.isfinite(out).all()
    assert any("bf16" in n for n in notices)  # fp16 on CPU said it runs as bf16
    assert resolve_precision("fp16", "cpu").name == "bf16"
    with pytest.raises(AdcError, match="dtype"):
        resolve_precision("int8", "cpu")


class OverflowsUnderAutocast(nn.Module):
    """Finite in fp32, NaN whenever autocast is on: stands in for fp16 overflow in norms or attention."""

    scale = 4

    def forward(self, x):
        up = nn.functional.interpolate(x, scale_factor=4, mode="nearest")
        return up * float("nan") if torch.is_autocast_enabled("cpu") else up


def test_non_finite_tiles_are_rerun_in_fp32():
    notices: list[str] = []
    x = torch.rand(3, 40, 24)
    out = upscale(OverflowsUnderAutocast(), x, tile=16, overlap=8, dtype="bf16", log=notices.append)
    assert torch.isfinite(out).all()
    assert (out - nn.functional.interpolate(x[None], scale_factor=4)[0]).abs().max() <= 1e-6
    assert any("rerunning in fp32" in n for n in notices)


class AlwaysNaN(nn.Module):
    def forward(self, x):
        return nn.functional.interpolate(x, scale_factor=4) * float("nan")


def test_non_finite_in_fp32_is_an_error():
    with pytest.raises(AdcError, match="non-finite model output even in fp32"):
        upscale(AlwaysNaN(), torch.rand(3, 16, 16))


@pytest.mark.slow
def test_half_precision_is_finite_on_every_sample_image(tiny_adcsr):
    for path in sample_images():
        x = to_chw_tensor(read_image(path))
        for tile in (None, 96):
            out = upscale(tiny_adcsr, x, tile=tile, overlap=32, dtype="fp16", log=lambda m: None)
            assert torch.isfinite(out).all(), (path.name, tile)
