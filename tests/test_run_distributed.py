"""``compress.run`` under 2 processes (torchrun, gloo on CPU): each stage once, training on both, resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, tiny_distill_recipe
from test_recover_ddp import free_port

SAMPLES = REPO / "data" / "samples" / "realsr"
RECIPE = tiny_distill_recipe(
    "two", f"{{train_hr: [{SAMPLES / 'HR'}], eval_lr: {SAMPLES / 'LR'}, eval_hr: {SAMPLES / 'HR'}, eval_limit: 1}}",
    "{crop: 64, prompt: empty, adv_weight: 0.1, engine: {max_steps: 2, batch_size: 2, checkpoint_every: 1}}",
    "  - report: {}\n")


def _launch(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "-m", "compress.run", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=540)


@pytest.mark.slow
def test_two_processes_run_each_stage_once_and_resume(tmp_path):
    recipe = tmp_path / "two.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    proc = _launch([str(recipe), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stderr.count("[remove] done") == 1  # one process logs, the other follows
    assert "[distill] running on 2 processes" in proc.stderr
    assert proc.stdout.count("report: ") == 1
    summary = json.loads((out / "02-distill" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_batch"] == 2
    assert sorted(p.parent.name for p in out.glob("*/DONE.json")) == ["00-remove", "01-prune", "02-distill", "03-report"]
    assert len(list((out / "02-distill" / "checkpoints").iterdir())) == 1  # keep_checkpoints: written once
    again = _launch([str(recipe), "--out", str(out), "--resume"], tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert again.stderr.count("done before, skipped (--resume)") == 4
