"""``train_teacher``: a short supervised warm-up of a *tiny* OSEDiff-shaped teacher.

Why: the offline demo has no real OSEDiff weights, and distilling from a random network
teaches nothing. A few hundred steps of L1 on Real-ESRGAN-degraded sample images give a
tiny teacher whose SR outputs beat its random init, so every later stage has something real
to preserve. With real weights (``models.size: full``) this stage is refused: the teacher is
the user's OSEDiff.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AdcError
from ..io import save_safetensors


@dataclass
class TrainTeacherConfig:
    lr: float = 5e-4
    crop: int = 128
    prompt: str = "empty"  # the tiny teacher is conditioned on the fixed empty-prompt embedding
    engine: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        from ..recover.engine import EngineConfig

        EngineConfig.from_dict(self.engine, f"{path}.engine").validate(f"{path}.engine")
        if self.crop % 64:
            raise AdcError(f"{path}.crop: {self.crop} is not a multiple of 64 (LR = crop/4 must divide by 16)")


def run_train_teacher_needs(bundle, config: TrainTeacherConfig) -> list[str]:
    return []


def run_train_teacher(bundle, config: TrainTeacherConfig, stage_dir: Path) -> dict[str, Any]:
    from ..data import DegradationConfig, RealESRGANDegradation
    from ..recover.decoder_pretrain import hr_crops
    from ..recover.engine import EngineConfig, StepContext, TrainSetup, item_seed, train
    from ..zoo.osediff import build_osediff

    if bundle.size != "tiny":
        raise AdcError("stages.train_teacher: only for models.size: tiny (full size uses your OSEDiff weights)")
    recipe = bundle.recipe
    torch.manual_seed(recipe.seed)
    teacher = build_osediff("tiny")
    # DAPE is not trained here (its tied BERT weights would also clutter the checkpoints): set aside.
    dape, teacher.prompt_extractor = teacher.prompt_extractor, None
    teacher.requires_grad_(True)
    teacher.text_encoder.requires_grad_(False)
    with torch.no_grad():
        prompt = teacher.encode_prompt()
    degrade = RealESRGANDegradation(DegradationConfig.from_dict(recipe.data.degradation, "recipe.data.degradation"))
    dataset = hr_crops(list(recipe.data.train_hr), config.crop, True, recipe.seed)
    params = [p for p in teacher.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)

    def step_fn(ctx: StepContext, batch: dict) -> None:
        hr = batch["data"]
        lr_img = torch.cat([degrade(hr[i:i + 1], seed=item_seed(recipe.seed, int(e), int(j)))
                            for i, (e, j) in enumerate(zip(batch["epoch"], batch["index"]))])
        with ctx.autocast():
            sr = ctx.model("teacher")(lr_img * 2 - 1, prompt.to(ctx.device))
            loss = (sr.float() - (hr * 2 - 1)).abs().mean()
        ctx.optimize("teacher", {"l1": loss})

    setup = TrainSetup(name="train_teacher", trainable={"teacher": teacher}, optimizers={"teacher": opt},
                       losses={"teacher": ["l1"]}, step_fn=step_fn, dataset=dataset)
    engine = EngineConfig.from_dict(config.engine, "stages.train_teacher.engine").with_defaults(
        max_steps=300, batch_size=4, checkpoint_every=100)
    result = train(setup, engine, stage_dir)
    trained = result.models["teacher"]
    trained.prompt_extractor = dape
    weights = stage_dir / "teacher.safetensors"
    save_safetensors({k: v.detach().cpu() for k, v in trained.state_dict().items()}, weights)
    return {"weights": str(weights), "steps": result.step, "metrics": str(stage_dir / "metrics.csv"),
            "loss_curve": str(stage_dir / "loss_curve.png"), "steps_per_s": result.summary.get("steps_per_s")}
