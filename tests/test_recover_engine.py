"""The training engine: configs, NaN guard, checkpoints, kill -9 + resume = uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from compress.errors import AdcError
from compress.recover.decoder_pretrain import PretrainDecoderConfig
from compress.recover.distill import DistillConfig
from compress.recover.engine import (EngineConfig, NonFiniteLossError, StreamSampler, TrainSetup, latest_checkpoint,
                                     list_checkpoints, read_trainer_state, train)

from helpers import REPO, realsr


# ---------------------------------------------------------------------------------- configs
def test_unknown_keys_are_reported_with_their_path():
    with pytest.raises(AdcError, match=r"recipe\.stages\[5\]\.distill\.engine\.max_step: unknown key"):
        DistillConfig.from_dict({"engine": {"max_step": 3}}, "recipe.stages[5].distill")
    with pytest.raises(AdcError, match=r"pretrain_decoder\.init: 'random' is not one of"):
        PretrainDecoderConfig.from_dict({"init": "random"})
    with pytest.raises(AdcError, match=r"distill\.degradation\.noise_rang: unknown key"):
        DistillConfig.from_dict({"degradation": {"noise_rang": [1, 2]}})
    cfg = DistillConfig.from_dict({"lr_milestones": [10, 20], "engine": {"batch_size": 4}})
    assert cfg.lr_milestones == [10, 20] and cfg.engine.batch_size == 4 and cfg.lr_d == 1e-6
    # unset engine fields take the stage's defaults (AdcSR: 200 K steps, global batch 96)
    assert cfg.engine.with_defaults(**DistillConfig.ENGINE_DEFAULTS).max_steps == 200_000
    assert cfg.engine.with_defaults(**DistillConfig.ENGINE_DEFAULTS).batch_size == 4


def test_stream_positions_do_not_depend_on_the_process_count():
    one = StreamSampler(7, seed=3, start=5, local_batch=4)
    it = iter(one)
    single = [next(it) for _ in range(12)]
    split = []
    its = [iter(StreamSampler(7, seed=3, start=5, local_batch=2, num_processes=2, process_index=p)) for p in (0, 1)]
    for _ in range(3):  # 3 micro-batches: process 0 then process 1, each 2 items
        for it in its:
            split += [next(it) for _ in range(2)]
    assert single == split
    assert [k for k in single if k[0] == 1]  # crosses into epoch 1, reshuffled
    assert sorted(i for e, i in single[2:9]) == list(range(7))  # positions 7..13 = one full epoch 1


# ---------------------------------------------------------------------------------- NaN guard
class _Crops(torch.utils.data.Dataset):
    def __init__(self, root):
        from compress.data import HRCropDataset

        self.ds = HRCropDataset(root / "HR", crop=32, hflip=False, seed=0)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def _conv_setup(root, poison_step=None):
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 3, padding=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step_fn(ctx, batch):
        x = batch["data"]
        l1 = (ctx.model("net")(x) - x).abs().mean()
        reg = model.weight.pow(2).mean()
        if ctx.step == poison_step:
            reg = reg * float("nan")
        ctx.optimize("net", {"l1": l1, "reg": reg})

    return model, TrainSetup(name="toy", trainable={"net": model}, optimizers={"net": opt},
                             losses={"net": ["l1", "reg"]}, step_fn=step_fn, dataset=_Crops(root))


def test_nan_loss_stops_with_one_line_naming_step_and_term_and_keeps_the_last_checkpoint(tmp_path):
    root = realsr()
    model, setup = _conv_setup(root, poison_step=5)
    cfg = EngineConfig(max_steps=8, batch_size=2, checkpoint_every=2, keep_checkpoints=2, log_every=1, cpu=True,
                       progress=False)
    with pytest.raises(NonFiniteLossError) as info:
        train(setup, cfg, tmp_path, log=lambda s: None)
    msg = str(info.value)
    assert "\n" not in msg and "step 5" in msg and "'reg'" in msg and "nan" in msg
    last = latest_checkpoint(tmp_path)
    assert last is not None and last.name == "step-00000004" and str(last) in msg
    assert read_trainer_state(last)["step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert torch.isfinite(model.weight).all()  # the poisoned step was never applied
    saved = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert rows[-1].startswith("4,")  # steps 1-4 logged, nothing from the failed step


def test_resume_false_refuses_a_directory_with_checkpoints(tmp_path):
    root = realsr()
    _, setup = _conv_setup(root)
    cfg = EngineConfig(max_steps=2, batch_size=2, checkpoint_every=1, keep_checkpoints=2, cpu=True, progress=False)
    res = train(setup, cfg, tmp_path, log=lambda s: None)
    assert res.step == 2 and [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_per_s"] > 0 and summary["peak_memory_mib"] > 0
    _, setup = _conv_setup(root)
    with pytest.raises(AdcError, match="resume is false"):
        train(setup, EngineConfig(max_steps=3, batch_size=2, checkpoint_every=1, cpu=True, resume=False,
                                  progress=False), tmp_path, log=lambda s: None)


# ---------------------------------------------------------------------------------- kill -9
def _tiny(stage, args, run_dir):
    from compress.recover.tiny import main

    assert main([stage, "--run-dir", str(run_dir), *args]) == 0


OUTPUTS = {"stage1": ("decoder.safetensors", "halfDecoder.ckpt"),
           "stage2": ("student.safetensors", "discriminator_trainable.safetensors")}


@pytest.mark.parametrize("stage", ["stage1", pytest.param("stage2", marks=pytest.mark.slow)])
def test_kill9_then_resume_gives_bit_identical_weights(tmp_path, one_thread, stage):
    """stage1: decoder + PatchGAN (two Adams); stage2 adds the scheduler, LoRA D and the degradation."""
    root = realsr()
    args = ["--steps", "6", "--batch", "2", "--crop", "64", "--every", "2", "--hr", str(root / "HR")]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "compress.recover.tiny", stage, "--run-dir", str(killed),
                                 *args, "--delay", "0.6"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while not list_checkpoints(killed):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
                assert time.time() < deadline, "no checkpoint within 300 s"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = latest_checkpoint(killed)
    assert read_trainer_state(at_kill)["step"] < 6 and not (killed / OUTPUTS[stage][0]).exists()

    _tiny(stage, args, killed)  # resumes from the last complete checkpoint
    assert json.loads((killed / "summary.json").read_text())["steps_this_run"] < 6
    straight = tmp_path / "straight"
    _tiny(stage, args, straight)
    for name in OUTPUTS[stage]:
        load = load_file if name.endswith(".safetensors") else (lambda p: torch.load(p, weights_only=True)["state_dict"])
        a, b = load(str(killed / name)), load(str(straight / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the resumed run's metrics CSV has each step once (rows logged after the checkpoint were dropped)
    steps = [int(r.split(",")[0]) for r in (killed / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ([0] if stage == "stage1" else []) + [1, 2, 3, 4, 5, 6]  # stage 1 validates at step 0


def test_resume_falls_back_to_the_last_whole_checkpoint(tmp_path):
    """A crash or a full disk can leave the newest checkpoint cut short: resume from the one before."""
    root = realsr()
    cfg = EngineConfig(max_steps=4, batch_size=2, checkpoint_every=2, keep_checkpoints=2, log_every=1, cpu=True,
                       progress=False)
    straight_model, setup = _conv_setup(root)
    train(setup, cfg, tmp_path / "straight", log=lambda s: None)
    model, setup = _conv_setup(root)
    train(setup, cfg, tmp_path / "broken", log=lambda s: None)
    newest = latest_checkpoint(tmp_path / "broken")
    weights = next(newest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    notes = []
    model, setup = _conv_setup(root)
    res = train(setup, cfg, tmp_path / "broken", log=notes.append)
    assert any("step-00000004 cannot be resumed from" in n and "truncated" in n for n in notes)
    assert res.summary["steps_this_run"] == 2  # steps 3 and 4 again, from step 2
    assert (tmp_path / "broken" / "checkpoints" / ".broken-step-00000004").is_dir()  # set aside, not deleted
    assert torch.equal(model.weight, straight_model.weight)  # bit-identical to the uninterrupted run


# ---------------------------------------------------------------------------------- loss curves
def test_loss_curves_mark_the_schedule_and_show_raw_and_smoothed_lines(tmp_path):
    """Linear axes, one panel per term, the raw line in the legend beside the EMA, and a vertical
    line where the discriminator starts and where the lr steps (only those inside the run)."""
    import pandas as pd

    from compress.recover.distill import build_setup
    from compress.recover.engine import curve_markers, loss_figure, plot_losses

    steps = list(range(10, 101, 10))
    df = pd.DataFrame({"step": steps, "feat": [5.0 / s for s in steps],
                       "adv": [None] * 3 + [0.7] * 7, "d": [0.69] * 10})
    markers = {"discriminator starts": [1, 30], "lr x0.5": [60, 1000]}  # step 1 and 1000 mark nothing drawn
    assert curve_markers(markers, 100) == [(30, "discriminator starts"), (60, "lr x0.5")]
    fig = loss_figure(df, {"G": ["feat", "adv"], "D": ["d"]}, "t", markers)
    axes = [ax for ax in fig.axes if ax.lines]
    assert len(axes) == 3 and all(ax.get_yscale() == "linear" for ax in axes)
    for ax in axes:
        vertical = sorted(float(line.get_xdata()[0]) for line in ax.lines
                          if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2)
        assert vertical == [30.0, 60.0]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(lbl.startswith("raw") for lbl in labels) and any(lbl.startswith("EMA") for lbl in labels)
        assert "lr x0.5 (step 60)" in labels
    import matplotlib.pyplot as plt

    plt.close(fig)
    csv = tmp_path / "m.csv"
    df.to_csv(csv, index=False)
    assert plot_losses(csv, tmp_path / "c.png", {"G": ["feat"]}, "t", markers).stat().st_size > 1000
    # the distill stage passes its own schedule: adv_start and the lr milestones of its config
    from compress.recover.distill import DistillBundle, FeaturePair

    bundle = DistillBundle(student=nn.Linear(2, 2), teacher=nn.Linear(2, 2), pairs=[FeaturePair("", "")],
                           make_inputs=lambda b, d: {}, discriminator=nn.Linear(2, 1), real=nn.Linear(2, 2))
    setup = build_setup(bundle, DistillConfig(adv_start=50, lr_milestones=[80], lr_gamma=0.5), [torch.zeros(2)])
    assert setup.markers == {"discriminator starts": [50], "lr x0.5": [80]}


# ---------------------------------------------------------------------------------- keep_best
def _scripted_validation(root, scores: dict[int, float], seen: dict):
    """The toy conv set-up, validated every 2 steps with a score scripted by the step; ``seen`` gets
    the weights each validation saw."""
    from dataclasses import replace

    model, setup = _conv_setup(root)

    def validate(ctx):
        assert not torch.is_grad_enabled() and not ctx.unwrap("net").training
        seen[ctx.step] = ctx.unwrap("net").weight.detach().clone()
        return scores[ctx.step]

    return model, replace(setup, validate=validate, val_every=2, val_name="val_score", keep_best=("net",))


def test_keep_best_restores_the_best_validated_weights_and_survives_resume(tmp_path):
    root = realsr()
    scores = {0: 1.0, 2: 3.0, 4: 3.0, 5: 0.5, 6: 2.0}  # best at step 2 (a tie later keeps the earlier)
    cfg = dict(batch_size=2, checkpoint_every=2, keep_checkpoints=1, log_every=3, cpu=True, progress=False)
    seen: dict = {}
    model, setup = _scripted_validation(root, scores, seen)
    res = train(setup, EngineConfig(max_steps=6, **cfg), tmp_path / "straight", log=lambda s: None)
    assert sorted(seen) == [0, 2, 4, 6] and torch.equal(model.weight, seen[2]) and not torch.equal(seen[2], seen[6])
    v = res.summary["validation"]
    assert (v["start_step"], v["start"], v["best_step"], v["best"], v["last"], v["restored"]) == (0, 1.0, 2, 3.0, 2.0, True)
    rows = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",val_score")
    assert [(r.split(",")[0], r.split(",")[-1]) for r in rows[1:]] == \
        [("0", "1"), ("2", "3"), ("3", ""), ("4", "3"), ("6", "2")]  # step 6 is also a log row

    # stopped after step 4, then resumed to 6: the best (step 2) comes back from the checkpoint
    seen_a: dict = {}
    _, setup = _scripted_validation(root, scores, seen_a)
    train(setup, EngineConfig(max_steps=4, **cfg), tmp_path / "resumed", log=lambda s: None)
    state = read_trainer_state(latest_checkpoint(tmp_path / "resumed"))
    assert state["validation"]["best_step"] == 2 and (latest_checkpoint(tmp_path / "resumed") /
                                                       "best_weights.safetensors").is_file()
    seen_b: dict = {}
    model_b, setup = _scripted_validation(root, scores, seen_b)
    res = train(setup, EngineConfig(max_steps=6, **cfg), tmp_path / "resumed", log=lambda s: None)
    assert sorted(seen_b) == [6]  # not measured again at the resumed step
    assert torch.equal(model_b.weight, model.weight) and res.summary["validation"]["best_step"] == 2


def test_keep_best_names_trainable_modules_and_needs_a_validate_function(tmp_path):
    from dataclasses import replace

    _, setup = _conv_setup(realsr())
    with pytest.raises(AdcError, match="needs a validate function"):
        replace(setup, keep_best=("net",))
    with pytest.raises(AdcError, match=r"\['other'\], which are not trainable"):
        replace(setup, validate=lambda ctx: 0.0, keep_best=("other",))
