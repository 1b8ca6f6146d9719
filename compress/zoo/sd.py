"""Stable Diffusion 2.1-base components, built from their configs (never downloaded).

The configs are the published SD 2.1-base ones (``unet/``, ``vae/``, ``text_encoder/`` and
``scheduler/`` of a diffusers directory). ``tiny`` configs keep every block type, block
count and wiring but use small widths, so tests and the offline demo exercise the same
structure on a CPU in seconds.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdcError
from .construct import build_module

# diffusers calls the head *count* "attention_head_dim" in SD 2.x configs (a historical naming bug).
SD21_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    upcast_attention=False,
)

SD21_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)

# OpenCLIP ViT-H/14 text tower as diffusers ships it for SD 2.x (the last of 24 layers is dropped).
SD21_TEXT_ENCODER: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
)

SD21_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)

TINY_UNET: dict[str, Any] = dict(
    SD21_UNET,
    sample_size=16,
    block_out_channels=(32, 64, 64, 64),
    attention_head_dim=(2, 4, 4, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
)

TINY_VAE: dict[str, Any] = dict(
    SD21_VAE,
    block_out_channels=(16, 32, 32, 32),
    norm_num_groups=8,
    sample_size=64,
)

TINY_TEXT_ENCODER: dict[str, Any] = dict(
    SD21_TEXT_ENCODER,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=16,
)

SIZES = ("full", "tiny")


def _pick(size: str, full: dict[str, Any], tiny: dict[str, Any]) -> dict[str, Any]:
    if size not in SIZES:
        raise AdcError(f"model size {size!r} is not one of {', '.join(SIZES)}")
    return copy.deepcopy(full if size == "full" else tiny)


def unet_config(size: str = "full") -> dict[str, Any]:
    return _pick(size, SD21_UNET, TINY_UNET)


def vae_config(size: str = "full") -> dict[str, Any]:
    return _pick(size, SD21_VAE, TINY_VAE)


def text_encoder_config(size: str = "full") -> dict[str, Any]:
    return _pick(size, SD21_TEXT_ENCODER, TINY_TEXT_ENCODER)


def build_unet(size: str = "full", device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return build_module(lambda: UNet2DConditionModel(**{**unet_config(size), **overrides}), device)


def build_vae(size: str = "full", device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    from diffusers import AutoencoderKL

    return build_module(lambda: AutoencoderKL(**{**vae_config(size), **overrides}), device)


def build_text_encoder(size: str = "full", device: str | torch.device = "cpu") -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(**text_encoder_config(size))
    return build_module(lambda: CLIPTextModel(cfg), device)


def alpha_bar(t: int, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> float:
    """alpha_bar(t) of SD 2.x's scaled-linear DDPM schedule (alpha_bar(999) = 0.0046601).

    Plain Python floats (float64), so it also works while tensors default to ``meta``.
    """
    lo, hi = beta_start**0.5, beta_end**0.5
    step = (hi - lo) / (num_train_timesteps - 1)
    prod = 1.0
    for i in range(t + 1):
        prod *= 1.0 - (lo + i * step) ** 2
    return prod


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """The whole schedule as a float64 CPU tensor."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64, device="cpu") ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def one_step_x0(z_t: torch.Tensor, eps: torch.Tensor, t: int = 999) -> torch.Tensor:
    """x0 = (z_t - sqrt(1 - a_bar) * eps) / sqrt(a_bar), computed analytically.

    Why not ``scheduler.step``: after ``set_timesteps(1)`` its result depends on the diffusers
    version (exact x0 in 0.25, an IndexError in 0.32).
    """
    a = alpha_bar(t)
    return (z_t - (1.0 - a) ** 0.5 * eps) / a**0.5


def load_sd_components(path: str | Path, components: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> dict[str, nn.Module]:
    """Load SD components from a local diffusers directory (``unet/``, ``vae/``, ``text_encoder/``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    out: dict[str, nn.Module] = {}
    for name in components:
        if name not in loaders:
            raise AdcError(f"unknown SD component {name!r}; expected one of {', '.join(loaders)}")
        sub = path / name
        if not sub.is_dir():
            raise AdcError(f"{sub}: missing; expected a diffusers directory with a {name}/ subfolder")
        try:
            out[name] = loaders[name].from_pretrained(path, subfolder=name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise AdcError(f"{sub}: could not load {name} ({str(exc).splitlines()[0][:160]})") from None
    return out


def build_vae_decoder(size: str = "full", device: str | torch.device = "cpu") -> nn.Module:
    """The VAE's diffusers ``Decoder`` alone (conv_in 4 -> ... -> RGB): what AdcSR prunes to half width."""
    return build_vae(size, device).decoder
