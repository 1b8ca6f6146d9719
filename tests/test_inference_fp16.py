"""fp16 that cannot NaN: measure activation ranges in fp32, keep the over-range blocks in fp32.

A tiny student whose first convolution is scaled by 1e5 stands in for real weights whose
activations leave fp16's range: fp32 handles it, plain fp16 autocast turns it into inf/NaN, and
the measured policy brings fp16 back to finite and close to fp32. CPU fp16 autocast is used here
(slow but exact enough for the mechanics); on a GPU the same code runs CUDA autocast.
"""

import pytest
import torch

from compress.errors import AdcError
from compress.inference import Precision, upscale
from compress.inference.fp16 import FP16_MAX, activation_ranges, calibrate, fp32_units, keep_fp32, load_policy
from compress.zoo.adcsr import build_adcsr

FP16_CPU = Precision("fp16", "cpu", "fp16")  # forced: resolve_precision would turn CPU fp16 into bf16
# Stated tolerance of fp16 autocast + policy against fp32, max abs in [0, 1] output units, measured on this
# random tiny student (its colour fix amplifies differences; see reports/fp16-ranges.md for trained models).
TOL_01 = 0.05


def overflowing_student():
    torch.manual_seed(0)
    model = build_adcsr("tiny").eval()
    with torch.no_grad():
        model.unet.conv_in.weight.mul_(1e5)  # conv_in outputs ~1e5 > 65504: inf in fp16
        model.unet.conv_in.bias.mul_(1e5)
    return model


def lr_batch(seed=0, h=32, w=48):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_ranges_find_the_blocks_that_leave_fp16(one_thread):
    model = overflowing_student()
    ranges = activation_ranges(model, [lr_batch()])
    assert ranges["unet.conv_in"].out_max > FP16_MAX  # measured in fp32, so the value itself is there
    assert ranges["unshuffle"].out_max <= 1.0  # the input side is in [-1, 1]
    keep = fp32_units(model, ranges)
    assert "unet.conv_in" in keep  # the producer
    assert "unet.down_blocks.0.resnets.0" in keep  # its consumer: over range on its input
    assert "up.conv_out" not in keep and all(not k.startswith("up.") for k in keep)  # the decoder is in range
    # What runs in fp16 (neither a kept unit, inside one, nor a container of one) stays below 65504 / 4.
    fp16_modules = [n for n in ranges if n and not any(n == k or n.startswith(k + ".") or k.startswith(n + ".")
                                                       for k in keep)]
    assert fp16_modules and all(ranges[n].peak <= FP16_MAX / 4 for n in fp16_modules)


def test_fp16_with_the_policy_is_finite_and_close_to_fp32(one_thread):
    model = overflowing_student()
    x = lr_batch(1)
    with torch.no_grad():
        ref = model(x)
        assert torch.isfinite(ref).all()
        with torch.autocast("cpu", dtype=torch.float16):
            plain = model(x)
        assert not torch.isfinite(plain).all()  # the failure the policy exists for
        policy, _ = calibrate(model, [lr_batch(0)])  # calibrated on another image
        with keep_fp32(model, policy.keep_fp32) as handle, torch.autocast("cpu", dtype=torch.float16):
            assert handle.count == len(policy.keep_fp32) > 0
            safe = model(x)
    assert torch.isfinite(safe).all()
    assert (safe.float() - ref).abs().max() / 2 <= TOL_01
    assert "forward" not in model.unet.conv_in.__dict__  # the handle put the class's forward back


def test_upscale_fp16_with_blocks_needs_no_fallback(one_thread):
    model = overflowing_student()
    lr = torch.rand(3, 37, 45, generator=torch.Generator().manual_seed(2))
    notices = []
    ref = upscale(model, lr, dtype="fp32")
    fallback = upscale(model, lr, dtype=FP16_CPU, log=notices.append)
    assert any("rerunning in bf16" in n for n in notices)  # without the policy the engine must fall back
    policy, _ = calibrate(model, [lr_batch()])
    notices.clear()
    got = upscale(model, lr, dtype=FP16_CPU, log=notices.append, fp32_blocks=policy.keep_fp32)
    assert notices == []  # finite on the first try: fp16 throughout except the kept blocks
    assert torch.isfinite(got).all() and (got - ref).abs().max() <= TOL_01
    assert torch.isfinite(fallback).all()


def test_policy_file_round_trip_and_mismatch(tmp_path, one_thread):
    model = overflowing_student()
    policy, _ = calibrate(model, [lr_batch()], name="overflowing tiny")
    path = policy.save(tmp_path / "policy.json")
    back = load_policy(path)
    assert back.keep_fp32 == policy.keep_fp32 and back.limit == pytest.approx(FP16_MAX / 4)
    with pytest.raises(AdcError, match="does not have"):
        keep_fp32(model, ["unet.no_such_block"])
    (tmp_path / "bad.json").write_text('{"format": "adc-fp16-policy", "keep_fp32": "unet"}')
    with pytest.raises(AdcError, match="list of module names"):
        load_policy(tmp_path / "bad.json")


def test_an_in_range_model_keeps_nothing(one_thread):
    torch.manual_seed(0)
    model = build_adcsr("tiny").eval()
    policy, ranges = calibrate(model, [lr_batch()])
    assert policy.keep_fp32 == [] and max(r.peak for r in ranges.values()) < FP16_MAX / 4


def test_sr_cli_fp16_policy_choices(tmp_path, one_thread):
    """compress.sr --fp16-policy: auto measures the first image, FILE reads a policy, off keeps nothing."""
    from argparse import Namespace

    from compress.sr import _fp16_blocks

    model = overflowing_student()
    first = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(4))
    auto = _fp16_blocks(Namespace(fp16_policy="auto"), model, first, lambda m: None)
    assert auto and "unet.conv_in" in auto
    assert model.color_fix  # the calibration switched the colour fix off only while it ran
    path = calibrate(model, [lr_batch()])[0].save(tmp_path / "p.json")
    assert _fp16_blocks(Namespace(fp16_policy=str(path)), model, None, lambda m: None) == load_policy(path).keep_fp32
    assert _fp16_blocks(Namespace(fp16_policy="off"), model, first, lambda m: None) is None


def test_fp16_report_measures_the_runs_shipped_teacher(tmp_path):
    """``python -m compress.deploy.fp16 RUN --teacher`` loads the teacher the run's stages used: here the
    demo's shipped checkpoint, through the run's family (no train_teacher stage in the run)."""
    import yaml

    from compress.deploy.fp16 import load_teacher
    from compress.io import load_safetensors
    from compress.recipe import load_recipe
    from helpers import REPO

    recipe = load_recipe(REPO / "recipes" / "adcsr-tiny.yaml")
    (tmp_path / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    teacher = load_teacher(tmp_path)
    shipped = load_safetensors(recipe.models.checkpoint)
    got = teacher.state_dict()
    assert got.keys() == shipped.keys()
    assert all(torch.equal(got[k], shipped[k].to(got[k].dtype)) for k in shipped)
    with pytest.raises(AdcError, match="not a run folder"):
        load_teacher(tmp_path / "elsewhere")
