"""The run-folder lock (issue 22): one ``compress.run`` per run folder; a dead holder's lock is taken over."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.errors import AdcError
from compress.ownership import LOCK, FolderLock

ROOT = Path(__file__).resolve().parents[1]
# A run that takes the folder and stops at once: its only stage needs data the recipe does not give (exit 3).
QUICK_RUN = "name: lock\ndevice: cpu\nmodels: {family: osediff, size: tiny}\nstages:\n  - evaluate: {methods: [bicubic]}\n"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "compress.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _write_lock(folder: Path, pid: int, host: str | None = None) -> str:
    text = json.dumps({"pid": pid, "host": host or socket.gethostname(), "command": "compress.run",
                       "since_epoch": time.time(), "since": "earlier"})
    (folder / LOCK).write_text(text)
    return text


@pytest.fixture
def run_folder(tmp_path):
    (tmp_path / "r.yaml").write_text(QUICK_RUN)
    assert _run(["r.yaml", "--out", "run"], tmp_path).returncode == 3
    return tmp_path / "run"


def test_a_lock_held_by_a_live_process_refuses_a_second_run(run_folder):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        text = _write_lock(run_folder, sleeper.pid)
        proc = _run(["r.yaml", "--out", "run", "--resume"], run_folder.parent)
        assert proc.returncode == 2
        line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(line) == 1 and "Traceback" not in proc.stderr
        assert "run: in use by compress.run" in line[0] and f"pid {sleeper.pid}" in line[0]
        assert (run_folder / LOCK).read_text() == text  # the holder's lock is left alone
        assert "[evaluate]" not in proc.stderr  # no stage ran
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_is_taken_over_with_a_notice_and_released(run_folder):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    _write_lock(run_folder, pid)
    proc = _run(["r.yaml", "--out", "run", "--resume"], run_folder.parent)
    assert proc.returncode == 3, proc.stderr
    notices = [ln for ln in proc.stderr.splitlines() if "taking over" in ln]
    assert len(notices) == 1 and f"pid {pid}" in notices[0]
    assert not (run_folder / LOCK).exists()


def test_a_live_flock_holder_refuses_and_the_lock_goes_on_release(tmp_path):
    with FolderLock(tmp_path, "compress.run") as held:
        info = json.loads(held.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(AdcError, match=rf"in use by compress.run \(pid {os.getpid()}, since"):
            FolderLock(tmp_path, "compress.run").acquire()  # the flock: another open file description
    assert not (tmp_path / LOCK).exists()


def test_a_lock_from_another_host_is_refused_with_what_to_do(tmp_path):
    _write_lock(tmp_path, 12345, host="some-other-host")
    with pytest.raises(AdcError, match=r"pid 12345 on host some-other-host.*delete .*\.adc-lock"):
        FolderLock(tmp_path, "compress.run").acquire()


def test_the_lock_is_released_on_error_and_ctrl_c(run_folder, monkeypatch, capsys):
    import compress.run as run

    proc = _run(["r.yaml", "--out", "run", "--resume", "--set", "seed=7"], run_folder.parent)
    assert proc.returncode == 2 and "recipe changed" in proc.stderr
    assert not (run_folder / LOCK).exists()

    def interrupt(*args, **kwargs):
        assert (run_folder / LOCK).exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_run_stages", interrupt)
    assert run.main([str(run_folder.parent / "r.yaml"), "--out", str(run_folder), "--resume"]) == 130
    assert not (run_folder / LOCK).exists()


def test_sr_takes_the_same_lock(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from compress.sr import main

    (tmp_path / "lr").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "lr" / "x.png")
    out = tmp_path / "sr"
    with FolderLock(out, "compress.sr"):
        assert main(["--model", "adcsr", "--size", "tiny", "--device", "cpu", "--input", str(tmp_path / "lr"),
                     "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {out}: in use by compress.sr (pid {os.getpid()}" in err
    assert sorted(p.name for p in out.iterdir()) == []
