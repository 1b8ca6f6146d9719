"""A generic one-step SD super-resolver: any ``UNet2DConditionModel`` + ``AutoencoderKL`` pair.

LR [-1, 1] -> resize x scale -> VAE encoder (latent mode or sample) x scaling -> UNet once at a
fixed timestep with a fixed text embedding (or none) -> x0 from the UNet's prediction
(``epsilon``, ``v_prediction`` or ``sample``, as its scheduler config says) -> VAE decoder.
This is the shape of OSEDiff, S3Diff and most one-step SR models without their extras; a user's
own model from a local diffusers folder runs through it (the ``onestep`` family).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdcError


@dataclass(frozen=True)
class OneStepConfig:
    timestep: int = 999
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    scale: int = 4
    upscale: Literal["bicubic", "bilinear"] = "bicubic"
    latent: Literal["mode", "sample"] = "mode"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"


def alphas_cumprod(config: OneStepConfig) -> torch.Tensor:
    """The scheduler's alphas_cumprod (float64), from its beta schedule."""
    n = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n, dtype=torch.float64,
                               device="cpu") ** 2
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64, device="cpu")
    else:
        raise AdcError(f"beta_schedule {config.beta_schedule!r}: only scaled_linear and linear are supported")
    return torch.cumprod(1.0 - betas, dim=0)


class OneStepSR(nn.Module):
    """LR [-1, 1] (B,3,h,w) -> SR [-1, 1] (B,3,s*h,s*w) in one UNet call."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module | None = None,
                 config: OneStepConfig = OneStepConfig(), prompt_embeds: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.timestep, self.scale = config.timestep, config.scale
        self.scaling_factor = float(getattr(getattr(vae, "config", None), "scaling_factor", 0.18215))
        a = float(alphas_cumprod(config)[config.timestep])
        self._sqrt_a, self._sqrt_1ma = a ** 0.5, (1 - a) ** 0.5
        cad = getattr(unet.config, "cross_attention_dim", None) if hasattr(unet, "config") else None
        if prompt_embeds is None and cad is not None:
            dim = cad[0] if isinstance(cad, (list, tuple)) else cad
            prompt_embeds = torch.zeros(1, 77, dim)
        # a constant condition, saved with the model (the text encoder, if any, made it)
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=True)

    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        return F.interpolate(lr, scale_factor=self.scale, mode=self.config.upscale, align_corners=False)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(image).latent_dist
        return (dist.sample() if self.config.latent == "sample" else dist.mode()) * self.scaling_factor

    def x0(self, z: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (z - self._sqrt_1ma * pred) / self._sqrt_a
        if kind == "v_prediction":
            return self._sqrt_a * z - self._sqrt_1ma * pred
        return pred

    def teacher_latent(self, lr: torch.Tensor, prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The one-step x0 latent (scaled, as the decoder reads it after dividing by the scaling)."""
        z = self.encode(self.upscale(lr))
        emb = self.prompt_embeds if prompt_embeds is None else prompt_embeds
        kwargs = {}
        if emb is not None:
            kwargs["encoder_hidden_states"] = emb.to(z.dtype).expand(z.shape[0], -1, -1) if emb.shape[0] == 1 else emb
        t = torch.full((z.shape[0],), self.timestep, device=z.device, dtype=torch.long)
        return self.x0(z, self.unet(z, t, **kwargs).sample)

    def forward(self, lr: torch.Tensor, prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.teacher_latent(lr, prompt_embeds)
        return self.vae.decode(x0 / self.scaling_factor).sample.clamp(-1, 1)

    def components(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {}
        if self.text_encoder is not None:
            parts["text_encoder"] = self.text_encoder
        parts["vae.encoder"] = nn.ModuleDict({"encoder": self.vae.encoder, "quant_conv": self.vae.quant_conv})
        parts["unet"] = self.unet
        parts["vae.decoder"] = nn.ModuleDict({"post_quant_conv": self.vae.post_quant_conv, "decoder": self.vae.decoder})
        return parts


def config_from_scheduler(folder: Path, **overrides) -> OneStepConfig:
    """A :class:`OneStepConfig` from ``folder/scheduler/scheduler_config.json`` (when present) and overrides."""
    import json

    values = {}
    f = Path(folder) / "scheduler" / "scheduler_config.json"
    if f.is_file():
        try:
            cfg = json.loads(f.read_text())
        except ValueError as exc:
            raise AdcError(f"{f}: not valid JSON ({exc})") from None
        for key in ("prediction_type", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
            if key in cfg:
                values[key] = cfg[key]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return OneStepConfig(**values)


def load_onestep(folder: str | Path, prompt: str | None = None, **config) -> OneStepSR:
    """A :class:`OneStepSR` from a local diffusers folder (``unet/``, ``vae/``; ``text_encoder/`` and
    ``tokenizer/`` only for a ``prompt``). Nothing is downloaded."""
    from .sd import load_sd_components

    folder = Path(folder)
    parts = load_sd_components(folder, ("unet", "vae"))
    emb = None
    text_encoder = None
    if prompt is not None:
        from transformers import CLIPTokenizer

        if not (folder / "tokenizer").is_dir():
            raise AdcError(f"{folder / 'tokenizer'}: missing; a prompt needs the folder's CLIP tokenizer")
        text_encoder = load_sd_components(folder, ("text_encoder",))["text_encoder"]
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        ids = tok([prompt], max_length=tok.model_max_length, padding="max_length", truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            emb = text_encoder(ids)[0]
    return OneStepSR(parts["unet"], parts["vae"], text_encoder, config_from_scheduler(folder, **config), emb).eval()


__all__ = ["OneStepSR", "OneStepConfig", "alphas_cumprod", "load_onestep", "config_from_scheduler"]
