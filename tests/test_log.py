"""Logging as the field's tools do it: progress lines instead of redrawn bars off a terminal, a run.log
with levels and logger names, and accelerate's trackers."""

import logging
import subprocess
import sys

import pytest

from compress.log import get_logger, log_to_file, progress

from helpers import REPO, realsr


def _records(name: str):
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return records, lambda: logger.removeHandler(handler)


def test_progress_off_a_terminal_writes_periodic_lines_not_a_bar(capsys):
    records, done = _records("adc.test.progress")
    try:
        items = list(progress(range(5), "scoring", logger=get_logger("test.progress"), every_s=0.0))
    finally:
        done()
    assert items == list(range(5))
    lines = [r.getMessage() for r in records]
    assert lines[0] == "scoring: 1/5 (0 s)" and lines[-1].startswith("scoring: 5/5 done in")
    assert "\r" not in capsys.readouterr().err  # tqdm never drew (stderr is not a terminal under pytest)


def test_log_to_file_writes_level_logger_and_timestamp(tmp_path):
    path = tmp_path / "run.log"
    log_to_file(path)
    try:
        get_logger("compress.stages.demo").warning("checkpoint kept")
    finally:
        log_to_file(None)
    line = path.read_text().strip()
    assert line.endswith("WARNING adc.stages.demo: checkpoint kept") and line[:4].isdigit()  # 2026-...


@pytest.mark.slow  # a whole tiny run: about 14 s
def test_a_run_writes_run_log_and_no_carriage_returns(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "compress.run", str(REPO / "recipes" / "adcsr-tiny.yaml"), "--out",
                           str(run), "--stages", "analyse,remove,prune"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-500:]
    log = (run / "run.log").read_text()
    assert " INFO adc.run: [prune] done in " in log and "analyse osediff" in log  # the analysis reports progress
    assert "\r" not in proc.stderr and "\r" not in log


def test_tensorboard_tracker_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    import torch
    from torch import nn

    from compress.data import HRCropDataset
    from compress.recover.engine import EngineConfig, TrainSetup, train

    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 3, padding=1)

    def step_fn(ctx, batch):
        x = batch["data"]
        ctx.optimize("net", {"l1": (ctx.model("net")(x) - x).abs().mean()})

    setup = TrainSetup(name="toy", trainable={"net": model}, optimizers={"net": torch.optim.Adam(model.parameters())},
                       losses={"net": ["l1"]}, step_fn=step_fn,
                       dataset=HRCropDataset(realsr() / "HR", crop=32, hflip=False, seed=0))
    cfg = EngineConfig(max_steps=3, batch_size=2, checkpoint_every=3, log_every=1, cpu=True, progress=False,
                       trackers=["tensorboard"])
    train(setup, cfg, tmp_path, log=lambda s: None)
    events = list((tmp_path / "trackers").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
