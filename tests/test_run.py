"""The runner end to end on the tiny recipe (few steps), resume, and the no-weights stop."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.recipe import load_recipe
from compress.run import main, run_recipe

ROOT = Path(__file__).resolve().parents[1]
FEW_STEPS = [
    "stages.pretrain_decoder.engine.max_steps=3", "stages.pretrain_decoder.engine.checkpoint_every=3",
    "stages.pretrain_decoder.disc_start=2",
    "stages.distill.engine.max_steps=3", "stages.distill.engine.checkpoint_every=3",
    "stages.evaluate.limit=1", "stages.profile.repeats=1", "stages.profile.warmup=0", "data.eval_limit=1",
    "stages.distill.frozen_dtype=bf16",  # the memory lever: the teacher is cast for training only (checked below)
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    try:
        result = run_recipe(load_recipe(ROOT / "recipes" / "adcsr-tiny.yaml", FEW_STEPS), out, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_tiny_recipe_runs_every_stage_and_writes_the_report(tiny_run):
    out, result = tiny_run
    assert result["done"] == ["analyse", "remove", "prune", "pretrain_decoder", "distill", "evaluate", "profile",
                              "report"]
    assert not result["skipped"]
    report = (out / "report.md").read_text()
    for section in ("## Analysis of the teacher", "## Prune", "## Complexity: teacher vs student",
                    "## Quality on held-out pairs", "## Training", "Student SR against teacher SR"):
        assert section in report  # the demo trains on data/samples/train and evaluates on the RealSR pairs
    assert "random weights" not in report  # it starts from the shipped, trained teacher
    assert (out / "report.csv").is_file() and (out / "report.png").is_file()
    assert (out / "report_images.png").is_file() and "![LR, each method and HR" in report
    profile = json.loads(next(out.glob("*-profile/DONE.json")).read_text())["artifacts"]
    assert profile["ratios"]["params"] < 0.35 and profile["ratios"]["macs_total"] < 0.3
    evaluate = json.loads(next(out.glob("*-evaluate/DONE.json")).read_text())["artifacts"]
    assert set(evaluate["means"]) == {"bicubic", "teacher", "student"}


def test_the_bf16_lever_leaves_evaluate_the_fp32_teacher(tiny_run, one_thread):  # the run used 1 thread
    """``distill.frozen_dtype: bf16`` casts the frozen teacher for training only: the evaluate stage
    after it writes exactly what a freshly loaded fp32 teacher gives."""
    import numpy as np

    from compress.bundle import Bundle
    from compress.data.images import read_image, to_chw_tensor
    from compress.inference.engine import to_uint8_rows

    out, _ = tiny_run
    ev = next(out.glob("*-evaluate"))
    name = next((ev / "teacher").glob("*.png")).name
    lr01 = to_chw_tensor(read_image(ev / "LR" / name))[None]
    bundle = Bundle(load_recipe(ROOT / "recipes" / "adcsr-tiny.yaml", FEW_STEPS), out)
    with torch.no_grad():
        sr = bundle.family.evaluate_teacher(bundle.teacher(), lr01)
    fresh = to_uint8_rows(sr[0].clamp(0, 1))
    written = to_uint8_rows(to_chw_tensor(read_image(ev / "teacher" / name)))
    assert np.array_equal(fresh, written)


def test_the_run_directory_is_a_model_for_compress_sr(tiny_run):
    from compress.sr import load_sr_model
    from compress.zoo.adcsr import build_adcsr

    out, _ = tiny_run
    model = load_sr_model(out, "tiny", "cpu", log=lambda m: None)
    reference = build_adcsr("tiny")  # the zoo's AdcSR student: same parameter names and shapes
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert model(torch.rand(1, 3, 32, 32) * 2 - 1).shape == (1, 3, 128, 128)


def test_resume_skips_finished_stages(tiny_run):
    out, _ = tiny_run
    args = [str(ROOT / "recipes" / "adcsr-tiny.yaml"), "--out", str(out), "--resume"] + \
        [a for s in FEW_STEPS for a in ("--set", s)]
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    log = (out / "run.log").read_text()
    this_call = log[log.rindex("run directory"):]  # run.log keeps every call's lines
    assert this_call.count("done before, skipped (--resume)") == 8


def test_a_second_run_without_resume_overwrites_nothing(tiny_run):
    out, _ = tiny_run
    before = (out / "report.md").read_text()
    proc = subprocess.run([sys.executable, "-m", "compress.run", str(ROOT / "recipes" / "adcsr-tiny.yaml"),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "report.md").read_text() == before


def test_resume_refuses_a_changed_recipe(tiny_run):
    out, _ = tiny_run
    proc = subprocess.run([sys.executable, "-m", "compress.run", str(ROOT / "recipes" / "adcsr-tiny.yaml"),
                           "--out", str(out), "--resume", "--set", "seed=7"], capture_output=True, text=True)
    assert proc.returncode == 2 and "recipe changed" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_full_recipe_without_weights_runs_to_its_clear_stop(tmp_path):
    # Full size without weights: everything on meta (~20 s CPU, < 1 GiB RSS; profiling/bench_analysis.py --recipe)
    import resource

    proc = subprocess.run([sys.executable, "-m", "compress.run", str(ROOT / "recipes" / "adcsr.yaml"),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr  # 3: stopped, weights needed
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 4 * 2**20  # KiB: under 4 GiB
    stop = [line for line in proc.stderr.splitlines() if line.startswith("stopped:")]
    assert len(stop) == 1 and "models.weights.sd21_base" in stop[0] and "models.weights.osediff" in stop[0]
    written = sum(f.stat().st_size for f in (tmp_path / "run").rglob("*") if f.is_file())
    assert written < 20 * 2**20  # records and reports only: no random weights nobody asked for
    prune = json.loads(next((tmp_path / "run").glob("*-prune/DONE.json")).read_text())["artifacts"]
    assert prune["params_after"] == 456_073_683  # the official AdcSR student, from the generic transformations
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Stopped early" in report and "494.97 G" in report and "549.50 G" in report


def _strings(obj, key=""):
    """(key path, value) of every string in a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, f"{key}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(obj, str):
        yield key, obj


def test_every_done_json_records_its_environment_and_paths_relative_to_the_run(tiny_run):
    import os
    import platform

    out, _ = tiny_run
    markers = sorted(out.glob("[0-9][0-9]-*/DONE.json"))
    assert len(markers) == 8
    for marker in markers:
        done = json.loads(marker.read_text())
        env = done["environment"]
        assert env["torch"] == torch.__version__ and env["python"] == platform.python_version(), marker
        assert {"diffusers", "transformers", "peft", "accelerate", "torch-pruning", "numpy", "adc", "git_commit",
                "device", "torch_threads", "date"} <= set(env)
        for key, value in _strings(done["artifacts"]):
            assert not os.path.isabs(value), (marker.parent.name, key, value)
            looks_like_path = " " not in value and ("/" in value or value.endswith((".md", ".csv", ".png", ".html")))
            assert not looks_like_path or (out / value).exists(), (marker.parent.name, key, value)


def test_the_report_stands_alone(tiny_run):
    import re

    out, _ = tiny_run
    report = (out / "report.md").read_text()
    evaluate = json.loads((out / "05-evaluate" / "DONE.json").read_text())["artifacts"]
    headline = re.findall(r"Student SR vs HR: PSNR-Y \*\*([\d.]+) dB", report)
    assert headline == [f"{evaluate['means']['student']['psnr']:.2f}"]  # one number, the evaluate stage's
    summary = report[report.index("## Summary"):report.index("## Analysis")]
    assert headline[0] in summary and "on the first 1 eval pairs" in report  # the recovery checks say what they are
    assert "[per_image.csv](05-evaluate/per_image.csv)" in report and (out / "05-evaluate" / "per_image.csv").is_file()
    assert "widen_module (unet.conv_in: " in report and "widen_module (unet.conv_out: " in report
    remove = json.loads((out / "01-remove" / "DONE.json").read_text())["artifacts"]
    prune = json.loads((out / "02-prune" / "DONE.json").read_text())["artifacts"]
    profile = json.loads((out / "06-profile" / "DONE.json").read_text())["artifacts"]
    student = next(r for r in profile["rows"] if r["model"] == "student")
    assert remove["records"][-1]["student_params_after"] == prune["params_before"] == remove["params"]
    assert prune["records"][-1]["student_params_after"] == prune["params_after"] == student["params"]
    assert re.search(r"\| student MACs / teacher MACs \| <= 0\.300x \| 0\.\d+x \| \*\*reached\*\* \|", report)
    assert "## Environment" in report and f"| torch | `{torch.__version__}` |" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and 'src="report_images.png"' not in html  # one shareable file
    assert '<h2 id="environment">Environment</h2>' in html


def test_a_changed_environment_is_reported_and_warned_once(tiny_run, tmp_path, monkeypatch):
    import shutil

    import compress.environment as environment

    out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    for stage in ("06-profile", "07-report"):  # two stages run again, "after an upgrade"
        (run / stage / "DONE.json").unlink()
    real = environment.collect
    monkeypatch.setattr(environment, "collect", lambda device=None: {**real(device), "torch": "0.0.0-other",
                                                                      "date": "2099-01-01T00:00:00+00:00"})
    threads = torch.get_num_threads()
    try:
        result = run_recipe(load_recipe(ROOT / "recipes" / "adcsr-tiny.yaml", FEW_STEPS), run, resume=True,
                            log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert result["done"][-2:] == ["profile", "report"]
    report = (run / "report.md").read_text()
    assert "**The environment differs from what earlier stages of this run recorded**" in report
    assert (f"- torch: {torch.__version__} (analyse, remove, prune, pretrain_decoder, distill, evaluate) -> "
            "0.0.0-other") in report
    assert "- date" not in report  # when a stage ran is no difference
    log = (run / "run.log").read_text()
    assert log[log.rindex("run directory"):].count("different environment") == 1  # profile warned, report did not


def test_the_report_shows_the_quality_chain_with_numbers(tiny_run):
    """Every link measured in the tiny run: the ceiling, stage 1 and stage 2 before -> after, the evaluate stage."""
    import re

    out, _ = tiny_run
    report = (out / "report.md").read_text()
    chain = report[report.index("## Quality chain"):]
    chain = chain[:chain.index("\n## ")]
    rows = {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")]
                                  for line in chain.splitlines() if line.startswith("| ")) if c[0] != "#"}
    assert list(rows) == ["1", "2", "3a", "3b", "4a", "4b", "4c", "4d"]
    number = re.compile(r"^-?\d+\.\d+( dB)?$")
    for key, cells in rows.items():
        assert number.match(cells[3]), (key, cells)  # "after": a number in every row
        assert key in ("1", "4b", "4c", "4d") or number.match(cells[2]), (key, cells)  # "before" where there is one
    pre = json.loads(next(out.glob("*-pretrain_decoder/DONE.json")).read_text())["artifacts"]
    v = pre["measured_values"]
    assert v["images"] == 1 and rows["1"][1] == "first 1 eval HR"
    assert rows["1"][3] == f"{v['teacher_vae_psnr_y']:.2f} dB" and rows["2"][3] == f"{v['decoder_psnr_y_after']:.2f} dB"
    assert pre["best_step"] in (0, 3) and pre["val_psnr_y"]["best"] >= pre["val_psnr_y"]["start"]  # keep_best
    assert pre["val_psnr_y"]["images"] == 8  # the first 8 training files, never the eval pairs
    evaluate = json.loads(next(out.glob("*-evaluate/DONE.json")).read_text())["artifacts"]
    assert rows["4c"][3] == f"{evaluate['means']['student']['psnr']:.2f} dB"
    assert (out / "report.csv").read_text().count("quality_chain") >= 8
