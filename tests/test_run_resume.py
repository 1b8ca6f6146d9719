"""``compress.run`` killed (-9) in the middle of a training stage, then ``--resume``: the same final weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from helpers import REPO, tiny_distill_recipe

SAMPLES = REPO / "data" / "samples" / "realsr"
RECIPE = tiny_distill_recipe(
    "killed", f"{{train_hr: [{SAMPLES / 'HR'}]}}",
    "{crop: 64, prompt: empty, adv_weight: 0.1, adv_start: 3, "
    "engine: {max_steps: 8, batch_size: 2, checkpoint_every: 2, keep_checkpoints: 2}}")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(recipe, out, *extra):
    return subprocess.run([sys.executable, "-m", "compress.run", str(recipe), "--out", str(out), *extra],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_kill9_in_a_stage_then_resume_gives_the_same_student(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "compress.run", str(recipe), "--out", str(killed)],
                                cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 500
            while not list(killed.glob("02-distill/checkpoints/step-*/trainer_state.json")):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
                assert time.time() < deadline
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert not (killed / "02-distill" / "DONE.json").exists()
    resumed = _run(recipe, killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and resumed.stderr.count("done before, skipped (--resume)") == 2
    straight = _run(recipe, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    for part in ("unet", "decoder"):
        a = load_file(str(killed / "02-distill" / "student" / part / "weights.safetensors"))
        b = load_file(str(tmp_path / "straight" / "02-distill" / "student" / part / "weights.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), part
