"""adc replaces only what it wrote itself and can prove it (issue 22): sr, run, evaluate, export.

A user's file in a folder adc writes into is refused with one line naming it, before any model
loads, and stays byte-identical; adc's own earlier outputs may be replaced.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compress.errors import AdcError
from compress.io import atomic_write_text
from compress.ownership import LOCK, WRITTEN, WriteRecord, check_own_folder

ROOT = Path(__file__).resolve().parents[1]
TINY_SR = ["--model", "adcsr", "--size", "tiny", "--device", "cpu", "--threads", "1"]
# A run that takes the folder and stops at once: its only stage needs data the recipe does not give (exit 3).
QUICK_RUN = "name: policy\ndevice: cpu\nmodels: {family: osediff, size: tiny}\nstages:\n  - evaluate: {methods: [bicubic]}\n"


def _image(path: Path, seed: int = 0, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _no_model(monkeypatch):
    """Make loading any model fail the test: a refusal must come first."""
    import compress.sr

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(compress.sr, "load_sr_model", fail)


# ----------------------------------------------------------------------------- compress.sr


def test_sr_refuses_a_users_file_in_the_output_folder_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from compress.sr import main

    src, hr = tmp_path / "lr", tmp_path / "hr"
    _image(src / "x.png")
    _image(hr / "x.png", seed=1, size=64)  # the ground truth: --output pointed at the HR folder by mistake
    before = {p.name: p.read_bytes() for p in hr.iterdir()}
    _no_model(monkeypatch)
    assert main([*TINY_SR, "--input", str(src), "--output", str(hr)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(hr / "x.png") in line and "refusing to replace" in line
    assert {p.name: p.read_bytes() for p in hr.iterdir()} == before  # untouched, and nothing added


def test_sr_reruns_into_its_own_output_but_not_over_a_file_changed_since(tmp_path, capsys):
    from compress.sr import main

    src, out = tmp_path / "lr", tmp_path / "sr"
    _image(src / "x.png")
    args = [*TINY_SR, "--input", str(src), "--output", str(out)]
    assert main(args) == 0
    assert main(args) == 0  # adc's own x.png, unchanged: replaced
    assert sorted(p.name for p in out.iterdir()) == [WRITTEN, "x.png"]  # the lock is gone
    (out / "x.png").write_bytes(b"the user's own file now")
    capsys.readouterr()
    assert main(args) == 2
    assert str(out / "x.png") in _error_line(capsys.readouterr().err)
    assert (out / "x.png").read_bytes() == b"the user's own file now"


# ----------------------------------------------------------------------------- compress.run


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "compress.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_run_refuses_a_folder_that_is_not_an_adc_run(tmp_path):
    (tmp_path / "r.yaml").write_text(QUICK_RUN)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own report\n")
    proc = _run(["r.yaml", "--out", "mine"], tmp_path)
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert "mine" in line and "report.md" in line and "not an adc run folder" in line
    assert sorted(p.name for p in mine.iterdir()) == ["report.md"]
    assert (mine / "report.md").read_text() == "my own report\n"
    dry = _run(["r.yaml", "--out", "mine", "--dry-run"], tmp_path)
    assert dry.returncode == 0 and "# note: the run refuses it" in dry.stdout


def test_run_takes_a_new_folder_and_resumes_its_own(tmp_path):
    (tmp_path / "r.yaml").write_text(QUICK_RUN)
    (tmp_path / "empty").mkdir()
    assert _run(["r.yaml", "--out", "empty"], tmp_path).returncode == 3  # 3: stopped for missing data
    assert WriteRecord(tmp_path / "empty").owner == "compress.run"
    assert not (tmp_path / "empty" / LOCK).exists()
    assert _run(["r.yaml", "--out", "empty", "--resume"], tmp_path).returncode == 3
    (tmp_path / "empty" / WRITTEN).unlink()  # a run folder from before the record: its recipe.resolved.yaml
    assert _run(["r.yaml", "--out", "empty", "--resume"], tmp_path).returncode == 3


# ----------------------------------------------------------------------------- compress.evaluate


def test_evaluate_refuses_a_users_report_and_replaces_its_own(tmp_path, capsys, monkeypatch):
    import compress.evaluate as ev

    for name in ("a.png", "b.png"):
        _image(tmp_path / "sr" / name, seed=2)
        _image(tmp_path / "hr" / name, seed=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.md").write_text("my notes\n")
    args = ["--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"), "--out", str(out), "--metrics", "psnr"]
    scored = []
    real = ev.evaluate_folders
    monkeypatch.setattr(ev, "evaluate_folders", lambda *a, **k: scored.append(1) or real(*a, **k))
    assert ev.main(args) == 2
    assert str(out / "summary.md") in _error_line(capsys.readouterr().err)
    assert not scored and sorted(p.name for p in out.iterdir()) == ["summary.md"]
    assert (out / "summary.md").read_text() == "my notes\n"
    (out / "summary.md").unlink()
    assert ev.main(args) == 0
    assert ev.main(args) == 0  # its own reports, unchanged since: replaced
    assert len(scored) == 2


# ----------------------------------------------------------------------------- compress.export


def _fake_export(path: Path, record: dict | None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/extra/adc.json" if record is not None else "model/other.bin",
                    json.dumps(record) if record is not None else b"weights")


def test_export_refuses_a_file_that_is_not_an_adc_export(tmp_path, capsys, monkeypatch):
    from compress.deploy.record import check_export_target
    from compress.export import main

    theirs = tmp_path / "theirs.pt2"
    _fake_export(theirs, None)
    before = theirs.read_bytes()
    _no_model(monkeypatch)
    assert main(["adcsr", "--size", "tiny", "--format", "torch-export", "--out", str(theirs)]) == 2
    assert str(theirs) in _error_line(capsys.readouterr().err)
    assert theirs.read_bytes() == before
    ours = tmp_path / "ours.pt2"
    _fake_export(ours, {"format": "adc-export"})
    check_export_target(ours)  # an export of adc's (its record) may be replaced
    check_export_target(tmp_path / "new.pt2")
    (tmp_path / "new.onnx.data").write_bytes(b"someone's weights")
    with pytest.raises(AdcError, match=r"new\.onnx\.data"):
        check_export_target(tmp_path / "new.onnx")


# ----------------------------------------------------------------------------- compress.io


def test_the_record_proves_only_unchanged_regular_files(tmp_path):
    rec = WriteRecord(tmp_path)
    atomic_write_text(tmp_path / "a.txt", "adc")
    rec.add(tmp_path / "a.txt")
    (tmp_path / "b.txt").write_text("user")
    os.symlink(tmp_path / "b.txt", tmp_path / "link.txt")
    with open(rec.path, "ab") as fh:
        fh.write(b'{"path": "b.txt", "finger')  # a line torn by a crash
    rec.add(tmp_path / "sub" / "c.txt", fingerprint=[1, 2])  # appended after the torn line, not into it
    again = WriteRecord(tmp_path)
    assert again.wrote(tmp_path / "a.txt") and set(again.files) == {"a.txt", "sub/c.txt"}
    assert not again.wrote(tmp_path / "b.txt") and not again.wrote(tmp_path / "link.txt")
    with pytest.raises(AdcError, match=r"refusing to replace .*link\.txt"):
        again.check(tmp_path / "link.txt")
    os.utime(tmp_path / "a.txt", ns=(0, 0))  # same bytes, touched: no longer provably adc's as written
    assert not WriteRecord(tmp_path).wrote(tmp_path / "a.txt")


def test_own_folder_check(tmp_path):
    check_own_folder(tmp_path / "new", "run")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / LOCK).write_text("{}")  # a lock left alone does not make a folder the user's
    check_own_folder(tmp_path / "x", "run")
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(AdcError, match=r"not an adc run folder \(it holds notes\.txt\)"):
        check_own_folder(tmp_path / "x", "run")
    WriteRecord(tmp_path / "x").claim("compress.run")
    check_own_folder(tmp_path / "x", "run")
