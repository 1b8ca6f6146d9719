"""The ``adc`` console script: the ``python -m`` entry points as subcommands."""

import subprocess
import sys

import compress
from compress.cli import main


def test_version_and_families(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"adc {compress.__version__}"
    assert main(["families"]) == 0
    listed = capsys.readouterr().out
    assert "osediff" in listed and "adcsr" in listed and "student" in listed


def test_subcommands_reach_their_entry_points(tmp_path, capsys):
    assert main(["analyse", "--model", "nothing", "--out", str(tmp_path / "a.md")]) == 2
    assert "unknown model 'nothing'" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_the_installed_script_runs():
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "adc run" not in proc.stderr and "commands:" in proc.stdout


# ---- CLI polish: usage names, bare adc, families, did-you-mean, broken pipes, --stages, --dry-run ----------

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "adcsr-tiny.yaml"


def _adc(*args: str, **kw) -> subprocess.Popen:
    """``adc ARGS`` in a fresh process (``python -m compress.cli``: the console script's entry point)."""
    return subprocess.Popen([sys.executable, "-m", "compress.cli", *args], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.fixture
def run_main():
    """``compress.run.main`` in-process; its console log handler (bound to this test's captured
    stderr) is taken off again afterwards, so later tests do not log into a closed stream."""
    import logging

    from compress.log import ROOT as LOGGER
    from compress.run import main as run

    logger = logging.getLogger(LOGGER)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield run
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_usage_lines_name_adc_or_the_module(capsys):
    from compress import run

    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: adc run ")
    with pytest.raises(SystemExit):
        run.main(["--help"])  # run as python -m compress.run: its own name
    assert capsys.readouterr().out.startswith("usage: python -m compress.run ")
    for cmd, module in (("evaluate", "compress.evaluate"), ("analyse", "compress.analysis.__main__"),
                        ("compare", "profiling.compare"), ("sr", "compress.sr")):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert capsys.readouterr().out.startswith(f"usage: adc {cmd} "), cmd
        with pytest.raises(SystemExit):
            __import__(module, fromlist=["main"]).main(["--help"])
        assert capsys.readouterr().out.startswith(f"usage: python -m {module.removesuffix('.__main__')} "), cmd


def test_bare_adc_prints_help_and_exits_2():
    proc = _adc(stdout=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "commands:" in err and "usage: adc COMMAND" in err and out == ""


def test_families_help_and_unknown_flags(capsys):
    assert main(["families", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: adc families")
    assert main(["families", "--all"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: adc families takes no arguments (got '--all')")


def test_unknown_command_says_did_you_mean(capsys):
    assert main(["rnu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown command 'rnu'; did you mean 'run'?")
    assert main(["xyzzy"]) == 2 and "did you mean" not in capsys.readouterr().err


def test_a_closed_stdout_is_no_traceback():
    """``adc ... | head``: the reader is gone before adc writes; adc ends quietly (141 or 0)."""
    import os

    procs = []
    for args in (["--help"], ["families"], ["run", "--help"]):
        read, write = os.pipe()
        os.close(read)  # the reader has gone: every write to the pipe fails with EPIPE
        procs.append((args, _adc(*args, stdout=write)))
        os.close(write)
    for args, proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 141) and err == "", (args, proc.returncode, err)


def test_a_refused_stages_leaves_no_run_directory(tmp_path, capsys, run_main):
    from compress.errors import AdcError
    from compress.recipe import load_recipe
    from compress.run import run_recipe

    out = tmp_path / "run"
    assert run_main([str(TINY), "--out", str(out), "--stages", "prune,analyse"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--stages: 'analyse' cannot come after 'prune'" in err
    assert run_main([str(TINY), "--out", str(out), "--stages", "anlyse"]) == 2
    assert "'anlyse' is not a stage of this recipe; did you mean 'analyse'?" in capsys.readouterr().err
    with pytest.raises(AdcError, match="is named twice"):
        run_recipe(load_recipe(TINY), out, only=["remove", "remove"])
    assert not out.exists()


def test_dry_run_prints_the_recipe_and_the_stages_and_creates_nothing(tmp_path, capsys, run_main):
    out = tmp_path / "run"
    assert run_main([str(TINY), "--out", str(out), "--dry-run", "--stages", "analyse,remove",
                     "--set", "stages.distill.lr_g=0.5"]) == 0
    text = capsys.readouterr().out
    resolved = yaml.safe_load(text)  # the plan is YAML comments: the output is the resolved recipe
    assert resolved["name"] == "adcsr-tiny" and resolved["stages"][4]["distill"]["lr_g"] == 0.5
    assert "#   00-analyse             runs\n" in text and "#   02-prune               skipped (not in --stages)" in text
    assert not out.exists()

    (out / "00-analyse").mkdir(parents=True)  # an earlier run that finished analyse
    (out / "00-analyse" / "DONE.json").write_text('{"stage": "analyse", "artifacts": {}}')
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert run_main([str(TINY), "--out", str(out), "--dry-run", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "00-analyse             skipped (done before; --resume)" in text and "01-remove              runs" in text
    assert run_main([str(TINY), "--out", str(out), "--dry-run"]) == 0
    assert "without --resume the run refuses it" in capsys.readouterr().out
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written
