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
