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
    assert decoder.conv_in.in_channels == 4  # kept for the teacher and ground-truth paths
    lr = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.isfinite(student(lr)).all()
