"""Hostile inputs, round 2 (issue 22, item 6-7): user mistakes are one ``error:`` line, exit 2, before the cost.

Each test names the input a careful user tried and the outcome adc promises. The image reader,
the write policy and the run lock have their own files (test_image_reader, test_write_policy,
test_run_lock); ``.pt2`` safety is in test_pt2_safety.
"""

from pathlib import Path

import pytest
import torch
from PIL import Image

from compress.export import main as export_main
from compress.run import main as run_main
from compress.sr import main as sr_main
from tests.helpers import STUDENT_RUN


def _png(path: Path, side: int = 24) -> Path:
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def structure_run(tmp_path_factory):
    """A run on ``meta``: the student's structure and records, no weights."""
    root = tmp_path_factory.mktemp("meta")
    (root / "s.yaml").write_text(STUDENT_RUN)
    assert run_main([str(root / "s.yaml"), "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.mark.parametrize("command", ["sr", "export"])
def test_a_structure_only_run_is_refused_by_sr_and_export_with_one_line(structure_run, tmp_path, command, capsys):
    if command == "sr":
        rc = sr_main(["--model", str(structure_run), "--input", str(_png(tmp_path / "a.png")),
                      "--output", str(tmp_path / "out")])
    else:
        rc = export_main([str(structure_run), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "structure only (device: meta)" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("flags, line", [
    (["--opset", "9"], "--opset 9: the torchscript exporter writes opsets 14 to 20"),
    (["--opset", "17", "--exporter", "dynamo"], "--opset 17: the dynamo exporter writes opsets 18 to 23"),
])
def test_an_opset_the_exporter_cannot_write_is_refused_not_replaced(tmp_path, flags, line, capsys):
    rc = export_main(["adcsr", "--size", "tiny", "--lr-size", "32", "--out", str(tmp_path / "m.onnx"), *flags])
    assert rc == 2 and f"error: {line}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_small_tile_takes_a_smaller_default_overlap_and_a_set_one_is_checked_first(tmp_path, capsys):
    lr = _png(tmp_path / "a.png", 24)
    rc = sr_main(["--model", "adcsr", "--size", "tiny", "--input", str(lr), "--output", str(tmp_path / "o"),
                  "--tile", "7"])
    err = capsys.readouterr().err
    assert rc == 0 and "--tile 7 rounded to 16" in err and "overlap" not in err
    with Image.open(tmp_path / "o" / "a.png") as im:
        assert im.size == (96, 96)
    rc = sr_main(["--model", "adcsr", "--size", "tiny", "--input", str(lr), "--output", str(tmp_path / "p"),
                  "--tile", "20", "--overlap", "8"])
    assert rc == 2 and "error: --overlap 8: expected at most 0 (the tile, 16 after rounding --tile 20" \
        in capsys.readouterr().err


def test_resume_on_a_corrupt_resolved_recipe_is_one_line(structure_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(structure_run, run)
    (run / "recipe.resolved.yaml").write_bytes(b"\xff\xfe\x00 not text")
    (tmp_path / "s.yaml").write_text(STUDENT_RUN)
    assert run_main([str(tmp_path / "s.yaml"), "--out", str(run), "--resume"]) == 2
    assert "recipe.resolved.yaml: not the UTF-8 text adc wrote" in capsys.readouterr().err


def test_an_image_less_training_folder_is_refused_before_the_first_stage(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(STUDENT_RUN.replace("task: {lr_size: 32}", f"task: {{lr_size: 32}}\ndata: {{train_hr: [{tmp_path / 'empty'}]}}")
                      + "  - pretrain_decoder: {max_steps: 1}\n")
    assert run_main([str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "data.train_hr[0]: " in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written
