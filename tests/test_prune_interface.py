"""widen_conv / widen_module / presliced_width: AdcSR's conv_in and conv_out, exactly."""

import pytest
import torch
from torch import nn

from compress.errors import AdcError
from compress.prune import presliced_width, widen_conv, widen_module


def _conv(i, o):
    torch.manual_seed(0)
    c = nn.Conv2d(i, o, 3, padding=1)
    with torch.no_grad():
        c.bias.normal_()
    return c


def test_conv_in_repeats_weight_along_inputs_bias_unchanged():
    sd_in = _conv(4, 8)
    new, rec = widen_conv(sd_in, in_channels=16)
    assert (new.in_channels, new.out_channels, new.padding) == (16, 8, (1, 1))
    assert torch.equal(new.weight, torch.cat([sd_in.weight] * 4, dim=1))  # official: weight.repeat(1, 4, 1, 1)
    assert torch.equal(new.bias, sd_in.bias)
    assert rec.args == {"in_channels": 16, "out_channels": 8, "mode": "repeat"}


def test_conv_out_repeats_and_truncates_outputs():
    sd_out = _conv(8, 4)
    new, _ = widen_conv(sd_out, out_channels=342)
    assert new.weight.shape == (342, 8, 3, 3)
    # official: weight.repeat(86, 1, 1, 1)[:342], bias.repeat(86)[:342]
    assert torch.equal(new.weight, sd_out.weight.repeat(86, 1, 1, 1)[:342])
    assert torch.equal(new.bias, sd_out.bias.repeat(86)[:342])
    idx = torch.arange(342) % 4
    assert torch.equal(new.weight, sd_out.weight[idx])


def test_zeros_mode_keeps_the_function_on_original_inputs():
    c = _conv(4, 6)
    new, _ = widen_conv(c, in_channels=6, out_channels=9, mode="zeros")
    x = torch.randn(2, 4, 5, 5)
    # the new inputs have zero weights, the new outputs are zero (and zero bias)
    assert torch.allclose(new(torch.cat([x, torch.zeros(2, 2, 5, 5)], 1))[:, :6], c(x), atol=1e-6)
    assert torch.count_nonzero(new.weight[:, 4:]) == 0 and torch.count_nonzero(new.weight[6:]) == 0


def test_widen_module_in_place_and_errors():
    model = nn.Sequential(_conv(4, 8), nn.ReLU(), _conv(8, 4))
    model, rec = widen_module(model, "0", in_channels=16)
    assert model[0].in_channels == 16 and rec.changes[0].name == "0"
    assert rec.params_after - rec.params_before == 8 * 12 * 9
    with pytest.raises(AdcError, match="no module"):
        widen_module(model, "conv_in", in_channels=16)
    with pytest.raises(AdcError, match="zeros mode only widens"):
        widen_conv(_conv(4, 8), in_channels=2, mode="zeros")
    with pytest.raises(AdcError, match=">= 1"):
        widen_conv(_conv(4, 8), out_channels=0)
    narrowed, _ = widen_conv(_conv(4, 8), out_channels=6)  # repeat mode keeps the leading outputs
    assert narrowed.out_channels == 6
    with pytest.raises(AdcError, match="mode"):
        widen_conv(_conv(4, 8), in_channels=8, mode="tile")


def test_presliced_width():
    assert presliced_width(12, 0.75) == 16 and int(16 * 0.75) == 12
    assert presliced_width(256, 0.75) == 342 and int(342 * 0.75) == 256
    assert presliced_width(16, 0.75) == 22 and int(22 * 0.75) == 16
    with pytest.raises(AdcError):
        presliced_width(12, 0)
