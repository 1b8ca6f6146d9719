"""The remove/prune stages build the AdcSR student from the teacher, with either time policy."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compress.bundle import Bundle
from compress.recipe import load_recipe
from compress.stages.structure import run_prune, run_remove
from compress.student import load_student, save_student
from compress.zoo.adcsr import build_adcsr

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.mark.parametrize("time", ["delete", "fold"])
def test_remove_then_prune_gives_the_adcsr_student_shapes(tmp_path, time):
    recipe = load_recipe(ROOT / "recipes" / "adcsr-tiny.yaml")
    bundle = Bundle(recipe, tmp_path)
    removed = run_remove(bundle, replace(recipe.stage("remove").config, time=time), tmp_path / "remove")
    ops = [r["op"] for r in removed["records"]]
    assert ops[:2] == (["remove_conditioning", "fold_timestep"] if time == "fold" else ["remove_conditioning", "widen_module"])
    run_prune(bundle, recipe.stage("prune").config, tmp_path / "prune")
    # the stages hand the student on in memory; the runner saves it once per stage, and it loads back
    student, decoder = load_student(save_student(tmp_path / "prune" / "student", bundle.student))
    assert torch.equal(student.unet.conv_in.weight, bundle.student.model.unet.conv_in.weight)
    reference = build_adcsr("tiny")
    assert {k: v.shape for k, v in student.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert decoder.conv_in.in_channels == bundle.teacher().vae.config.latent_channels  # for the teacher and GT paths
    lr = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.isfinite(student(lr)).all()


def test_taylor_ranks_unet_channels_by_the_distillation_loss(tmp_path):
    """importance: taylor calibrates on degraded training crops; same widths as magnitude, other channels."""
    students = {}
    for importance in ("magnitude", "taylor"):
        r = load_recipe(ROOT / "recipes" / "adcsr-tiny.yaml", ["stages.prune.unet.method=channels",
                                                               f"stages.prune.unet.channels.importance={importance}",
                                                               "stages.prune.unet.calibration_images=2"])
        bundle = Bundle(r, tmp_path / importance)
        run_remove(bundle, r.stage("remove").config, tmp_path / importance / "remove")
        run_prune(bundle, r.stage("prune").config, tmp_path / importance / "prune")
        students[importance] = bundle.student.model.unet.state_dict()
    mag, tay = students["magnitude"], students["taylor"]
    assert {k: v.shape for k, v in mag.items()} == {k: v.shape for k, v in tay.items()}
    assert not torch.equal(mag["down_blocks.0.resnets.0.conv1.weight"], tay["down_blocks.0.resnets.0.conv1.weight"])


@pytest.mark.parametrize("override, match", [
    ("stages.prune.decoder.channels.importance=taylor", "prune.decoder.channels.importance: taylor is for the unet"),
    ("stages.prune.unet.calibration_images=3", "prune.unet.calibration_images: expected an even number"),
])
def test_taylor_settings_are_checked_on_load(override, match):
    from compress.errors import AdcError

    with pytest.raises(AdcError, match=match):
        load_recipe(ROOT / "recipes" / "adcsr-tiny.yaml", [override])
