"""The ``onestep`` family: a user's own one-step SD super-resolver from a local diffusers folder.

``models: {family: onestep, size: full, weights: {path: /my/model}, options: {prompt: ...}}``
reads ``unet/`` and ``vae/`` (plus ``text_encoder/`` and ``tokenizer/`` for a fixed prompt, and
``scheduler/scheduler_config.json`` for the prediction type and noise schedule) and runs them as
:class:`compress.zoo.onestep.OneStepSR`. ``size: tiny`` is the same pipeline on the tiny SD
widths with random weights (tests and demos).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..errors import AdcError
from .base import DistillParts, ModelFamily, StudentParts, check_paths
from .sd import DecodeInput, FixedPrompt, RealLatent, base_copy
from ..config import ranged


@dataclass
class OneStepWeights:
    path: Path | None = None   # a diffusers folder: unet/ vae/ (text_encoder/ tokenizer/ scheduler/)

    HELP: ClassVar[dict[str, str]] = {"path": "a diffusers folder with unet/ and vae/"}

    def validate(self, path: str) -> None:
        check_paths(self, path)
        if self.path is not None:
            for sub in ("unet", "vae"):
                if not (self.path / sub).is_dir():
                    raise AdcError(f"{path}.path: {self.path} has no {sub}/ folder; expected {self.HELP['path']}")

    def missing(self, *names: str) -> list[str]:
        return [f"models.weights.{n} = {self.HELP[n]}" for n in names if getattr(self, n) is None]


@dataclass
class OneStepOptions:
    timestep: int = ranged(999, 0, 999)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None  # None: the scheduler config's
    scale: int = ranged(4, 1, 16)
    upscale: Literal["bicubic", "bilinear"] = "bicubic"
    latent: Literal["mode", "sample"] = "mode"
    prompt: str | None = None   # a fixed prompt (needs text_encoder/ and tokenizer/); None: zero embedding

    def validate(self, path: str) -> None:
        if not 0 <= self.timestep <= 999:
            raise AdcError(f"{path}.timestep: {self.timestep} is outside [0, 999]")
        if self.scale < 1:
            raise AdcError(f"{path}.scale: expected a positive integer, got {self.scale}")


class OneStepFamily(ModelFamily):
    name = "onestep"
    title = "one-step SD SR"
    Weights = OneStepWeights
    Options = OneStepOptions

    def _config(self, options: OneStepOptions | None, folder: Path | None = None):
        from ..zoo.onestep import OneStepConfig, config_from_scheduler

        o = options or OneStepOptions()
        kw = {"timestep": o.timestep, "prediction_type": o.prediction_type, "scale": o.scale, "upscale": o.upscale,
              "latent": o.latent}
        if folder is not None:
            return config_from_scheduler(folder, **kw)
        return OneStepConfig(**{k: v for k, v in kw.items() if v is not None})

    def build_teacher(self, size: str, device: str | torch.device = "cpu", options: Any = None) -> nn.Module:
        from ..zoo.construct import build_module
        from ..zoo.onestep import OneStepSR
        from ..zoo.sd import build_unet, build_vae

        cfg = self._config(options)
        return build_module(lambda: OneStepSR(build_unet(size, torch.get_default_device()),
                                              build_vae(size, torch.get_default_device()), None, cfg), device)

    def teacher_needs(self, weights: OneStepWeights) -> list[str]:
        return weights.missing("path")

    def load_teacher(self, size: str, weights: OneStepWeights, device="cpu", options: Any = None) -> nn.Module:
        if size != "full":
            return self.build_teacher(size, device, options)
        from ..zoo.onestep import load_onestep

        if weights.path is None:
            raise AdcError(f"the one-step teacher needs {'; '.join(self.teacher_needs(weights))}")
        o = options or OneStepOptions()
        return load_onestep(weights.path, o.prompt, timestep=o.timestep, prediction_type=o.prediction_type,
                            scale=o.scale, upscale=o.upscale, latent=o.latent).to(device)

    def example_inputs(self, lr_size: int, device="cpu", teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        inputs = super().example_inputs(lr_size, device, teacher)
        if teacher is not None and teacher.prompt_embeds is not None:  # the fixed condition, labelled as the prompt
            inputs["prompt_embeds"] = torch.zeros(teacher.prompt_embeds.shape, device=device)
        return inputs

    def facts(self, prompt: str, timestep: int):
        from ..analysis.facts import TaskFacts

        return TaskFacts(prompt=prompt, constant={"timestep": timestep}, prompt_sources=(), edges=())

    def init_needs(self, init: str, weights: OneStepWeights) -> list[str]:
        return weights.missing("path") if init in ("base", "teacher") else []

    def student_parts(self, size: str, weights: OneStepWeights, init: str, teacher, device="cpu") -> StudentParts:
        from ..student import decoder_part, unet_part
        from ..zoo.sd import build_unet, build_vae

        if init in ("base", "teacher") and (size == "tiny" or weights.path is not None):
            t = teacher()
            unet, vae, source = base_copy(t.unet), base_copy(t.vae), "the teacher's UNet and VAE"
        else:
            meta = init != "random"
            unet, vae = build_unet(size, "meta" if meta else device), build_vae(size, "meta" if meta else device)
            source = "random init (init: random)" if not meta else "structure only: no weights given, built on meta"
        return StudentParts(unet_part(unet, self.denoiser_path), decoder_part(vae, self.decoder_path), source)

    def real_vae_needs(self, weights: OneStepWeights) -> list[str]:
        return self.teacher_needs(weights)

    def real_vae(self, size: str, weights: OneStepWeights, teacher) -> nn.Module:
        return base_copy(teacher().vae)

    def distill_parts(self, teacher: nn.Module, size: str, weights: OneStepWeights, options: Any = None) -> DistillParts:
        from ..zoo.lora import sd_unet_lora_targets

        def prompts(mode: str, text: str):
            if mode not in ("fixed", "empty"):
                raise AdcError(f"prompt {mode!r}: a one-step model here has a fixed condition; use fixed or empty")
            return FixedPrompt(lambda: teacher.prompt_embeds if teacher.prompt_embeds is not None
                               else torch.zeros(1, 77, 1))

        return DistillParts(
            teacher_latent=lambda lr, emb: teacher.teacher_latent(lr),
            decode_input=DecodeInput(teacher.vae, teacher.scaling_factor),
            real_latent=RealLatent(base_copy(teacher.vae)),
            disc_unet=base_copy(teacher.unet), disc_lora_targets=sd_unet_lora_targets, prompts=prompts,
            timestep=teacher.timestep, teacher=teacher)


__all__ = ["OneStepFamily", "OneStepWeights", "OneStepOptions"]
