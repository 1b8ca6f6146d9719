"""A family defined entirely in tests/ runs through ``compress.run`` without touching ``compress/``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.run import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples" / "realsr"

RECIPE = f"""
name: plugin
seed: 0
device: cpu
threads: 1
plugins: [plugin_family]            # tests/plugin_family.py registers 'sd15-onestep' when imported
models: {{family: sd15-onestep, size: tiny}}
task: {{lr_size: 32}}
data: {{train_hr: [{SAMPLES / 'HR'}], eval_lr: {SAMPLES / 'LR'}, eval_hr: {SAMPLES / 'HR'}, eval_limit: 1}}
stages:
  - analyse: {{}}
  - remove: {{init: teacher}}
  - prune:
      unet: {{method: channels, channels: {{pruning_ratio: 0.25}}}}
      decoder: {{method: channels, channels: {{pruning_ratio: 0.5}}}}
  - pretrain_decoder: {{crop: 64, lpips_weight: 0.0, engine: {{max_steps: 2, batch_size: 2, checkpoint_every: 2}}}}
  - distill: {{crop: 64, prompt: empty, adv_weight: 0.1, engine: {{max_steps: 2, batch_size: 2, checkpoint_every: 2}}}}
  - evaluate: {{methods: [bicubic, teacher, student]}}
  - report: {{}}
"""


def test_a_family_from_tests_compresses_end_to_end(tmp_path, one_thread):
    recipe = tmp_path / "plugin.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    assert main([str(recipe), "--out", str(out)]) == 0
    done = {p.parent.name.split("-", 1)[1]: json.loads(p.read_text())["artifacts"] for p in out.glob("*/DONE.json")}
    assert set(done) == {"analyse", "remove", "prune", "pretrain_decoder", "distill", "evaluate", "report"}
    plan = json.loads((out / "00-analyse" / "plan.json").read_text())
    # SD 1.5's conv proj_in UNet: cross-attention removed (no prompt), time folded away, VAE encoder replaced
    removed = [d["module"] for d in plan["decisions"] if d["action"] == "remove"]
    assert any(m.endswith(".attn2") for m in removed) and "vae.encoder" in removed
    assert plan["reencoder"]["replacement"].startswith("replaceable by PixelUnshuffle(2)")
    prune = done["prune"]
    assert prune["params_after"] < 0.5 * prune["params_before"]
    assert prune["graphs"] == {"unet": "the analysis plan's", "decoder": "the analysis plan's"}
    assert set(done["evaluate"]["means"]) == {"bicubic", "teacher", "student"}
    assert "family sd15-onestep" in (out / "report.md").read_text()

    from compress.sr import load_sr_model

    student = load_sr_model(out, device="cpu", log=lambda m: None)
    assert student(torch.rand(1, 3, 32, 32) * 2 - 1).shape == (1, 3, 128, 128)


def test_an_unknown_family_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nmodels: {family: sd99-onestep}\nstages: [analyse]\n")
    assert main([str(recipe), "--out", str(tmp_path / "run")]) == 2  # no plugin registers it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "models.family: unknown model family 'sd99-onestep'" in err
    recipe.write_text("name: x\nplugins: [no_such_module]\nmodels: {family: osediff}\nstages: [analyse]\n")
    assert main([str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "plugins[0]: cannot import 'no_such_module'" in capsys.readouterr().err
