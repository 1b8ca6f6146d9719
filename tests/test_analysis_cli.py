"""``python -m compress.analysis``: writes Markdown + CSVs; a user mistake is one line and exit code 2."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from compress.analysis.__main__ import main
from compress.zoo.osediff import OSEDIFF_TINY


def test_cli_writes_markdown_and_csv(tmp_path, capsys, one_thread):
    out = tmp_path / "reports" / "analysis.md"
    rc = main(["--model", "osediff", "--component", "unet", "--size", "tiny", "--lr-size", "32", "--prompt", "dropped",
               "--out", str(out)])
    assert rc == 0
    md = out.read_text()
    assert md.startswith("# Compression analysis: osediff.unet (tiny)")
    summary = md[md.index("## Summary"):md.index("## How the numbers")]
    assert "| removable |" in summary and "| foldable |" in summary and "| prunable |" in summary
    assert "FlopCounterMode" in summary and "device meta" in summary and "float32" in summary  # no weights needed
    latent = OSEDIFF_TINY.unet_overrides["in_channels"]
    assert f"sample 1x{latent}x16x16" in summary  # the UNet's input at 32/8, latent width from the tiny config
    rows = pd.read_csv(out.with_suffix(".csv"))
    assert len(rows) > 100 and set(rows["classification"]) == {"removable", "foldable", "prunable", "keep"}
    groups = pd.read_csv(tmp_path / "reports" / "analysis.groups.csv")
    assert (groups["tags"].fillna("").str.contains("skip-concat")).any()
    assert "wrote" in capsys.readouterr().out
    assert not list(out.parent.glob("*.tmp"))  # atomic writes leave nothing behind


@pytest.mark.parametrize("argv, what", [
    (["--model", "resnet50"], "unknown model 'resnet50'"),
    (["--model", "osediff", "--prompt", "sometimes"], "--prompt 'sometimes'"),
    (["--model", "osediff", "--size", "huge"], "--size 'huge'"),
    (["--model", "osediff", "--component", "wheels"], "--component 'wheels'"),
    (["--model", "osedif"], "unknown model 'osedif'; did you mean 'osediff'?"),
    (["--model", "."], "--model .: folder has no recipe.resolved.yaml"),
    (["--plugin", "no_such_module", "--model", "osediff"], "--plugin[0]: cannot import 'no_such_module'"),
])
def test_cli_user_mistake_is_one_line_exit_2(tmp_path, capsys, argv, what):
    rc = main(argv + ["--out", str(tmp_path / "a.md")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and what in err and "Traceback" not in err
    assert not (tmp_path / "a.md").exists()


@pytest.mark.slow
def test_full_size_osediff_within_budget(tmp_path):
    """The full-size OSEDiff (1.77 B parameters) on meta: <= 60 s and <= 6 GiB RSS (see profiling/bench_analysis.py)."""
    import resource

    def cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    out = tmp_path / "analysis-osediff.md"
    assert main(["--model", "osediff", "--size", "full", "--out", str(out)]) == 0
    wall, seconds = time.perf_counter() - t0, cpu() - c0  # CPU time: other jobs on a shared CPU inflate wall time
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows = pd.read_csv(out.with_suffix(".csv"))
    total = rows["own_params"].sum()
    assert abs(total / 1e6 - 1765.30) < 0.01  # the models.md count, DAPE and LoRA included
    cls = dict(zip(rows["module"], rows["classification"]))
    assert cls["text_encoder"] == "removable" and cls["vae.encoder"] == "removable"
    assert cls["unet.time_embedding"] == "foldable"
    assert seconds <= 60 and rss_gib <= 6, (seconds, wall, rss_gib)


def test_the_analysis_total_less_its_lora_products_is_the_deployed_count(tmp_path, one_thread):
    """One MAC total per model: the analysis (LoRA unmerged) and profiling (merged) differ by the A/B products only."""
    import re

    from compress.families import get
    from compress.profile.pipeline import count_pipeline

    out = tmp_path / "a.md"
    assert main(["--model", "osediff", "--size", "tiny", "--lr-size", "32", "--prompt", "dropped", "--out", str(out)]) == 0
    line = next(ln for ln in out.read_text().splitlines() if "LoRA adapters unmerged" in ln)
    lora, deployed = (float(x.replace(",", "")) for x in re.findall(r"([\d,]+\.\d+) G", line)[:2])
    family = get("osediff")
    counts = count_pipeline(family.pipeline_spec(), family.build_teacher("tiny", "meta"), lr_size=32)
    assert lora > 0 and abs(deployed - counts.table["macs_total"].sum() / 1e9) < 0.01


# ---- --model: a run directory (its student, or its teacher), a plugin family ---------------------------

from helpers import STUDENT_RUN  # noqa: E402


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, one_thread_module):
    from compress.recipe import load_recipe
    from compress.run import run_recipe

    tmp = tmp_path_factory.mktemp("student_run")
    (tmp / "recipe.yaml").write_text(STUDENT_RUN)
    run_recipe(load_recipe(tmp / "recipe.yaml"), tmp / "run", log=lambda m: None)
    return tmp / "run"


def test_a_run_directory_is_analysed_as_its_student(student_run, tmp_path, capsys):
    out = tmp_path / "student.md"
    assert main(["--model", str(student_run), "--no-groups", "--out", str(out)]) == 0
    md = out.read_text()
    assert md.startswith("# Compression analysis: run (student) (tiny)")  # the run's size
    assert "lr 1x3x32x32" in md  # the run's task.lr_size, not the default 128
    rows = pd.read_csv(out.with_suffix(".csv"))
    assert "unet.conv_in" in set(rows["module"]) and not rows["module"].str.startswith("text_encoder").any()
    assert main(["--model", str(student_run), "--size", "full", "--out", str(out)]) == 2
    assert "--size 'full': the run" in capsys.readouterr().err


def test_a_run_directory_of_a_plugin_family_before_any_student(tmp_path, one_thread):
    """No student yet: the run's teacher, of a family the run's recipe imports as a plugin."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.resolved.yaml").write_text("name: p\nplugins: [plugin_family]\n"
                                              "models: {family: sd15-onestep, size: tiny}\ntask: {lr_size: 32}\n")
    out = tmp_path / "teacher.md"
    assert main(["--model", str(run), "--component", "unet", "--no-groups", "--out", str(out)]) == 0
    assert out.read_text().startswith("# Compression analysis: run (teacher).unet (tiny)")
