"""Pieces every Stable-Diffusion-based family shares (an ``AutoencoderKL`` + a ``UNet2DConditionModel``)."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn


class DecodeInput(nn.Module):
    """x0 latent (scaled) -> ``post_quant_conv(x0 / scaling)``: the decoder's ``conv_in`` input."""

    def __init__(self, vae: nn.Module, scaling: float):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.scaling = scaling

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.post_quant_conv(z / self.scaling)


class RealLatent(nn.Module):
    """HR [-1, 1] -> VAE encoder latent mean (unscaled) -> ``post_quant_conv`` (AdcSR's ground-truth path)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, hr: torch.Tensor) -> torch.Tensor:
        return self.vae.post_quant_conv(self.vae.encode(hr).latent_dist.mean)


class FixedPrompt:
    """A prompt embedding computed once (``make()``) and expanded to the batch."""

    def __init__(self, make: Callable[[], torch.Tensor]):
        self.make, self._emb = make, None

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        if self._emb is None:
            with torch.no_grad():
                self._emb = self.make()
        return self._emb.to(lr.device).expand(lr.shape[0], -1, -1)


def merged_copy(module: nn.Module) -> nn.Module:
    """A plain copy of a (possibly LoRA-wrapped) diffusers model, adapters merged into the weights."""
    from ..zoo.lora import lora_layers, merge_and_unload

    out = copy.deepcopy(module)
    if lora_layers(out):
        merge_and_unload(out)
    return out


def base_copy(module: nn.Module) -> nn.Module:
    """A plain copy of a diffusers model *without* its LoRA (for adapters that cannot be merged,
    such as S3Diff's degradation-modulated ones): its base weights under the plain names."""
    from ..zoo.lora import plain_key

    with torch.device("meta"):
        plain = type(module).from_config(module.config)
    state = {plain_key(k): v for k, v in module.state_dict().items() if plain_key(k) is not None}
    plain.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return plain.eval()


__all__ = ["DecodeInput", "RealLatent", "FixedPrompt", "merged_copy", "base_copy"]
