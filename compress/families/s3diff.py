"""The ``s3diff`` family: S3Diff (SD-Turbo + degradation-guided LoRA, CFG 1.07, one step at t = 999).

Its LoRA is modulated per image by the degradation estimate (``B . de_mod . A``), so it cannot
be merged: an AdcSR-style student starts from SD-Turbo's base weights (``init: base`` or
``teacher``: the teacher's base weights without the adapters) and learns the rest by
distillation from the full S3Diff teacher (both CFG passes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import AdcError
from .base import DistillParts, ModelFamily, PipelineSpec, StudentParts, check_paths
from .sd import DecodeInput, FixedPrompt, RealLatent, base_copy

TURBO_HELP = "an SD-Turbo diffusers folder (unet/ vae/ text_encoder/ tokenizer/)"


@dataclass
class S3DiffWeights:
    sd_turbo: Path | None = None   # SD-Turbo diffusers folder
    s3diff: Path | None = None     # s3diff.pkl
    de_net: Path | None = None     # de_net.pth (MM-RealSR's degradation estimator)

    HELP: ClassVar[dict[str, str]] = {"sd_turbo": TURBO_HELP, "s3diff": "S3Diff's s3diff.pkl",
                                      "de_net": "de_net.pth (assets/mm-realsr in S3Diff)"}

    def validate(self, path: str) -> None:
        check_paths(self, path)

    def missing(self, *names: str) -> list[str]:
        out = [f"models.weights.{n} = {self.HELP[n]}" for n in names if getattr(self, n) is None]
        if "sd_turbo" in names and self.sd_turbo is not None and not (self.sd_turbo / "tokenizer").is_dir():
            out.append(f"{self.sd_turbo}/tokenizer (S3Diff's fixed prompts need the CLIP tokenizer)")
        return out


def _s3diff_calls(model: nn.Module, lr: torch.Tensor) -> list:
    # Without a tokenizer the zoo forward encodes the empty prompt once and uses it twice; the
    # official inference encodes the positive and the negative prompt: one more encode.
    return [("forward", model, (lr,)), ("negative-prompt text encode", lambda: model.encode_prompt(), ())]


PROFILE = PipelineSpec(
    "S3Diff", _s3diff_calls, modulated_lora=True,
    includes=("DEResNet on the LR at its own size; degradation MLPs; CLIP-H text encoder twice "
              "(positive + negative prompt); bilinear x4 (+ reflect pad to 64); VAE encoder with "
              "rank-16 LoRA; UNet twice (CFG 1.07) with rank-32 LoRA; VAE decoder. The LoRA is "
              "degradation-modulated (B . de_mod . A), cannot be merged, and is counted."))


class S3DiffFamily(ModelFamily):
    name = "s3diff"
    title = "S3Diff"
    Weights = S3DiffWeights
    profile = PROFILE

    def build_teacher(self, size: str, device: str | torch.device = "cpu", options: Any = None) -> nn.Module:
        from ..zoo.s3diff import build_s3diff

        return build_s3diff(size, device)

    def teacher_needs(self, weights: S3DiffWeights) -> list[str]:
        return weights.missing("sd_turbo", "s3diff", "de_net")

    def load_teacher(self, size: str, weights: S3DiffWeights, device="cpu", options: Any = None) -> nn.Module:
        if size != "full":
            return self.build_teacher(size, device)
        from transformers import CLIPTokenizer

        from ..zoo.s3diff import load_s3diff_weights

        needs = self.teacher_needs(weights)
        if needs:
            raise AdcError(f"the S3Diff teacher needs {'; '.join(needs)}")
        model = load_s3diff_weights(weights.sd_turbo, weights.s3diff, weights.de_net)
        model.set_prompting(CLIPTokenizer.from_pretrained(weights.sd_turbo / "tokenizer", local_files_only=True))
        return model.to(device)

    def teacher_trainable(self, teacher: nn.Module) -> list[nn.Parameter]:
        # The text encoder and DEResNet stay frozen (as in S3Diff), and so do the fixed Fourier frequencies W.
        frozen = {id(p) for m in (teacher.text_encoder, teacher.de_net) for p in m.parameters()}
        frozen.add(id(teacher.guidance.W))
        return [p for p in teacher.parameters() if id(p) not in frozen]

    def facts(self, prompt: str, timestep: int):
        from ..analysis.facts import TaskFacts

        return TaskFacts(prompt=prompt, constant={"timestep": timestep}, prompt_sources=(), edges=())

    def init_needs(self, init: str, weights: S3DiffWeights) -> list[str]:
        return {"base": weights.missing("sd_turbo"), "teacher": self.teacher_needs(weights)}.get(init, [])

    def student_parts(self, size: str, weights: S3DiffWeights, init: str, teacher, device="cpu") -> StudentParts:
        from ..student import decoder_part, unet_part
        from ..zoo.s3diff import S3DIFF, S3DIFF_TINY
        from ..zoo.sd import build_unet, build_vae, load_sd_components

        if init == "base" and size == "full" and weights.sd_turbo is not None:
            parts = load_sd_components(weights.sd_turbo, ("unet", "vae"))
            unet, vae, source = parts["unet"], parts["vae"], "SD-Turbo (models.weights.sd_turbo)"
        elif init == "teacher" or (init == "base" and size == "tiny"):
            t = teacher()
            unet, vae = base_copy(t.unet), base_copy(t.vae)
            source = "the teacher's base weights (its degradation-modulated LoRA cannot be merged)"
        else:
            cfg = S3DIFF if size == "full" else S3DIFF_TINY
            meta = init != "random"
            unet, vae = build_unet(cfg.sd_size, "meta" if meta else device), build_vae(cfg.sd_size, "meta" if meta else device)
            source = "random init (init: random)" if not meta else "structure only: no weights given, built on meta"
        return StudentParts(unet_part(unet, self.denoiser_path), decoder_part(vae, self.decoder_path), source)

    def real_vae_needs(self, weights: S3DiffWeights) -> list[str]:
        return weights.missing("sd_turbo")

    def real_vae(self, size: str, weights: S3DiffWeights, teacher) -> nn.Module:
        if size == "full":
            from ..zoo.sd import load_sd_components

            return load_sd_components(weights.sd_turbo, ("vae",))["vae"]
        return base_copy(teacher().vae)

    def distill_parts(self, teacher: nn.Module, size: str, weights: S3DiffWeights, options: Any = None) -> DistillParts:
        from ..zoo.lora import sd_unet_lora_targets
        from ..zoo.s3diff import POSITIVE_PROMPT

        if size == "full":
            from ..zoo.sd import load_sd_components

            disc_unet = load_sd_components(weights.sd_turbo, ("unet",))["unet"]
        else:
            disc_unet = base_copy(teacher.unet)

        def prompts(mode: str, text: str):
            if mode == "dape":
                raise AdcError("S3Diff has no DAPE prompts; use prompt: fixed (its positive prompt) or empty")
            if mode == "empty" or teacher.tokenizer is None:
                return FixedPrompt(lambda: teacher.encode_prompt())
            return FixedPrompt(lambda: teacher.encode_prompt([text or POSITIVE_PROMPT]))

        return DistillParts(
            teacher_latent=lambda lr, emb: teacher.teacher_latent(lr),  # its own CFG prompt pair
            decode_input=DecodeInput(teacher.vae, teacher.scaling_factor),
            real_latent=RealLatent(self.real_vae(size, weights, lambda: teacher)),
            disc_unet=disc_unet, disc_lora_targets=sd_unet_lora_targets, prompts=prompts,
            timestep=teacher.timestep, teacher=teacher)


__all__ = ["S3DiffFamily", "S3DiffWeights", "PROFILE"]
