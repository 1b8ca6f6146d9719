"""``train_teacher``: train a *tiny* teacher of the recipe's family from scratch, as an SR model.

Why: the offline demo has no real weights, and distilling from a random network teaches
nothing. L1 training on Real-ESRGAN-degraded HR crops gives a tiny teacher whose outputs mean
something, so every later stage has something real to preserve. Its VAE is also fitted as an
autoencoder of the HR crops (``recon_weight``), as SD's VAE is one: AdcSR's decoder pretraining
and discriminator work on VAE latents of HR images, which must decode back to those images. The demo recipe loads a teacher
trained this way and shipped in ``data/teachers/`` (``models.checkpoint``; made by
``python profiling/train_tiny_teacher.py``); this stage stays available to retrain one. With
real weights (``models.size: full``) it is refused: the teacher is the user's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import AdcError
from ..io import save_safetensors
from ..recover.engine import EngineConfig
from ..config import ranged


@dataclass
class TrainTeacherConfig:
    lr: float = ranged(5e-4, 1e-12, 1.0)
    crop: int = ranged(128, 16, 8192)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: linear warm-up, then cosine decay to 0
    warmup_steps: int = ranged(0, 0, 10**9)
    # L1 of the teacher's VAE reconstruction of HR (families with an autoencoder)
    recon_weight: float = ranged(1.0, 0, 1e6)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self, path: str) -> None:
        if not self.lr > 0 or self.lr != self.lr or self.lr == float("inf"):
            raise AdcError(f"{path}.lr: expected a positive finite number, got {self.lr}")
        if not self.recon_weight >= 0:
            raise AdcError(f"{path}.recon_weight: expected >= 0, got {self.recon_weight}")
        if self.warmup_steps < 0:
            raise AdcError(f"{path}.warmup_steps: expected >= 0, got {self.warmup_steps}")
        if self.crop < 64 or self.crop % 64:
            raise AdcError(f"{path}.crop: {self.crop} is not a positive multiple of 64 (LR = crop/4 must divide by 16)")
        self.engine.validate(f"{path}.engine")


def check_train_teacher(recipe, config: TrainTeacherConfig, path: str) -> None:
    if recipe.models.size != "tiny":
        raise AdcError(f"{path}: only for models.size: tiny (full size uses your teacher weights)")


def run_train_teacher_needs(bundle, config: TrainTeacherConfig) -> list[str]:
    return [] if bundle.recipe.data.train_hr else ["data.train_hr = HR image folders to train the tiny teacher on"]


def lr_schedule(opt: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    """A ``LambdaLR``: linear warm-up over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_teacher(family, teacher, train_hr: list[Path], degradation, config: TrainTeacherConfig, run_dir: Path,
                  seed: int = 0, log=None):
    """Train ``teacher`` (the family says which parameters) with L1 on degraded HR crops; return the engine result."""
    from ..data import RealESRGANDegradation
    from ..recover.decoder_pretrain import hr_crops
    from ..recover.engine import StepContext, TrainSetup, item_seed, train

    from ..families.base import ModelFamily

    degrade = RealESRGANDegradation(degradation)
    dataset = hr_crops(list(train_hr), config.crop, True, seed)
    # the family has an autoencoder to fit (its own teacher_autoencode), and the recipe wants it
    recon = config.recon_weight > 0 and type(family).teacher_autoencode is not ModelFamily.teacher_autoencode

    def step_fn(ctx: StepContext, batch: dict) -> None:
        hr = batch["data"]
        lr_img = torch.cat([degrade(hr[i:i + 1], seed=item_seed(seed, int(e), int(j)))
                            for i, (e, j) in enumerate(zip(batch["epoch"], batch["index"]))])
        with ctx.autocast():
            terms = {"l1": (family.teacher_forward(ctx.model("teacher"), lr_img * 2 - 1, train=True).float()
                            - (hr * 2 - 1)).abs().mean()}
            if recon:
                rec = family.teacher_autoencode(ctx.model("teacher"), hr * 2 - 1)
                terms["recon"] = (rec.float() - (hr * 2 - 1)).abs().mean()
        ctx.optimize("teacher", terms, weights={"recon": config.recon_weight})

    engine = config.engine.with_defaults(max_steps=300, batch_size=4, checkpoint_every=100)
    with family.training_view(teacher) as module:
        module.requires_grad_(False)
        params = family.teacher_trainable(module)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=config.lr)
        schedulers = {"teacher": lr_schedule(opt, config.lr_schedule, config.warmup_steps, engine.max_steps)}
        setup = TrainSetup(name="train_teacher", trainable={"teacher": module}, optimizers={"teacher": opt},
                           losses={"teacher": ["l1"] + (["recon"] if recon else [])}, step_fn=step_fn, dataset=dataset, schedulers=schedulers,
                           markers={"lr warm-up ends": [config.warmup_steps]} if config.warmup_steps else {})
        result = train(setup, engine, run_dir, log=log)
    return result


def run_train_teacher(bundle, config: TrainTeacherConfig, stage_dir: Path) -> dict[str, Any]:
    recipe = bundle.recipe
    torch.manual_seed(recipe.seed)
    teacher = bundle.family.build_teacher("tiny", "cpu", bundle.options)
    result = train_teacher(bundle.family, teacher, recipe.data.train_hr, recipe.data.degradation, config, stage_dir,
                           recipe.seed)
    weights = stage_dir / "teacher.safetensors"
    save_safetensors({k: v.detach().cpu() for k, v in teacher.state_dict().items()}, weights)  # DAPE included
    return {"weights": bundle.rel(weights), "steps": result.step, "metrics": bundle.rel(stage_dir / "metrics.csv"),
            "loss_curve": bundle.rel(stage_dir / "loss_curve.png"), "steps_per_s": result.summary.get("steps_per_s")}
