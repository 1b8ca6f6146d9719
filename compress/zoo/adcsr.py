"""The AdcSR student (Chen et al., CVPR 2025), as the official code builds it.

LR in [-1, 1] -> PixelUnshuffle(2) -> UNet without time embedding and cross-attention, every
layer at 75 % of SD 2.1-base width -> half-width VAE decoder from its ``mid_block`` on ->
per-channel colour match to the LR. 456.07 M parameters at full size.

Written as ordinary modules with the official parameter shapes; :func:`load_official` maps the
official checkpoint layout (``net_params_*.pkl`` + ``halfDecoder.ckpt``) onto it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdcError
from ..io import safe_torch_load
from .construct import build_module
from .sd import SD21_UNET
from .unet import ConditionFreeUNet, strip_conditioning

# AdcSR's GroupNorm rule after width scaling: the first of these that divides the channel count.
GN_DIVISORS: tuple[int, ...] = (32, 24, 16, 12, 8, 6, 4, 2, 1)


def first_divisor(channels: int, divisors: tuple[int, ...] = GN_DIVISORS) -> int:
    for d in divisors:
        if channels % d == 0:
            return d
    raise AdcError(f"no GroupNorm group count in {divisors} divides {channels} channels")


@dataclass(frozen=True)
class AdcSRConfig:
    """Widths of the student. Full size = the official model; ``tiny`` keeps the structure."""

    unet_block_out_channels: tuple[int, ...] = (240, 480, 960, 960)
    unet_heads: tuple[int, ...] = (5, 10, 20, 20)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = SD21_UNET["down_block_types"]
    up_block_types: tuple[str, ...] = SD21_UNET["up_block_types"]
    unshuffle: int = 2
    decoder_block_out_channels: tuple[int, ...] = (64, 128, 256, 256)
    decoder_norm_groups: int = 32
    latent_channels: int = 4
    gn_divisors: tuple[int, ...] = GN_DIVISORS

    @property
    def in_channels(self) -> int:
        return 3 * self.unshuffle**2

    @property
    def feature_channels(self) -> int:
        """Width of the decoder mid-block: the UNet's output and the distillation feature."""
        return self.decoder_block_out_channels[-1]

    @property
    def pad_multiple(self) -> int:
        """LR sides must divide by unshuffle x 2^(number of UNet downsamplers)."""
        return self.unshuffle * 2 ** (len(self.unet_block_out_channels) - 1)


ADCSR = AdcSRConfig()
# AdcSR's cut of the tiny OSEDiff teacher: UNet at 75 % width, VAE decoder at 50 %, its 16-channel latent.
ADCSR_TINY = AdcSRConfig(unet_block_out_channels=(24, 48, 48, 48), unet_heads=(2, 4, 4, 4),
                         decoder_block_out_channels=(8, 16, 32, 32), decoder_norm_groups=8, latent_channels=16)


def regroup_norms(module: nn.Module, divisors: tuple[int, ...] = GN_DIVISORS) -> None:
    """Set each GroupNorm's group count by AdcSR's first-divisor rule (shapes are unchanged)."""
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            m.num_groups = first_divisor(m.num_channels, divisors)


def build_condition_free_unet(block_out_channels, heads, layers_per_block, in_channels, out_channels,
                              down_block_types, up_block_types, divisors=GN_DIVISORS) -> ConditionFreeUNet:
    """An SD-structured UNet at the given widths with no time or text conditioning."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        **{**SD21_UNET, "block_out_channels": tuple(block_out_channels), "attention_head_dim": tuple(heads),
           "layers_per_block": layers_per_block, "in_channels": in_channels, "out_channels": out_channels,
           "down_block_types": tuple(down_block_types), "up_block_types": tuple(up_block_types),
           # Built with one group and a 1-wide text input; both are fixed right below.
           "norm_num_groups": 1, "cross_attention_dim": 1})
    strip_conditioning(unet)
    body = ConditionFreeUNet.from_unet(unet)
    regroup_norms(body, divisors)
    return body


def build_half_decoder(config: AdcSRConfig = ADCSR) -> nn.Module:
    """The pruned VAE decoder (diffusers ``Decoder``), as stage 1 trains it and ``halfDecoder.ckpt`` stores it."""
    from diffusers.models.autoencoders.vae import Decoder

    n = len(config.decoder_block_out_channels)
    return Decoder(in_channels=config.latent_channels, out_channels=3, up_block_types=("UpDecoderBlock2D",) * n,
                   block_out_channels=tuple(config.decoder_block_out_channels), layers_per_block=2,
                   norm_num_groups=config.decoder_norm_groups, act_fn="silu", norm_type="group",
                   mid_block_add_attention=True)


class DecoderUpPath(nn.Module):
    """The VAE decoder after its mid-block: up blocks -> GroupNorm -> SiLU -> conv_out."""

    def __init__(self, up_blocks: nn.ModuleList, conv_norm_out: nn.Module, conv_act: nn.Module, conv_out: nn.Module):
        super().__init__()
        self.up_blocks = up_blocks
        self.conv_norm_out = conv_norm_out
        self.conv_act = conv_act
        self.conv_out = conv_out

    @classmethod
    def from_decoder(cls, decoder: nn.Module) -> "DecoderUpPath":
        return cls(decoder.up_blocks, decoder.conv_norm_out, decoder.conv_act, decoder.conv_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


def match_color(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """AdcSR's colour fix: per image and channel, give ``sr`` the mean and (unbiased) std of ``ref``."""
    dims = (2, 3)
    sr_mean, sr_std = sr.mean(dims, keepdim=True), sr.std(dims, keepdim=True)
    return (sr - sr_mean) / sr_std * ref.std(dims, keepdim=True) + ref.mean(dims, keepdim=True)


class AdcSR(nn.Module):
    """LR [-1,1] (B,3,h,w) -> SR [-1,1] (B,3,4h,4w) in one pass."""

    def __init__(self, unet: ConditionFreeUNet, mid_block: nn.Module, up: DecoderUpPath,
                 config: AdcSRConfig = ADCSR, color_fix: bool = True):
        super().__init__()
        self.config = config
        self.color_fix = color_fix
        self.unshuffle = nn.PixelUnshuffle(config.unshuffle)
        self.unet = unet
        self.mid_block = mid_block
        self.up = up

    @classmethod
    def from_config(cls, config: AdcSRConfig = ADCSR, color_fix: bool = True) -> "AdcSR":
        unet = build_condition_free_unet(config.unet_block_out_channels, config.unet_heads, config.layers_per_block,
                                         config.in_channels, config.feature_channels, config.down_block_types,
                                         config.up_block_types, config.gn_divisors)
        decoder = build_half_decoder(config)
        return cls(unet, decoder.mid_block, DecoderUpPath.from_decoder(decoder), config, color_fix)

    def features(self, lr: torch.Tensor) -> torch.Tensor:
        """The decoder mid-block output: what stage-2 distillation matches to the teacher."""
        return self.mid_block(self.unet(self.unshuffle(lr)), None)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        sr = self.up(self.features(lr))
        return match_color(sr, lr) if self.color_fix else sr

    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "decoder.mid_block": self.mid_block, "decoder.up": self.up}


def build_adcsr(size: str = "full", device: str | torch.device = "cpu", config: AdcSRConfig | None = None) -> AdcSR:
    if config is None:
        if size not in ("full", "tiny"):
            raise AdcError(f"model size {size!r} is not one of full, tiny")
        config = ADCSR if size == "full" else ADCSR_TINY
    return build_module(lambda: AdcSR.from_config(config), device)


# --------------------------------------------------------------------------------------------
# The official checkpoint layout
# --------------------------------------------------------------------------------------------
# net_params_*.pkl: the DDP state dict of Net(body=Sequential(PixelUnshuffle, unet, mid_block)).
# The official unet also registers its blocks a second time as unet.body = Sequential(*down,
# mid, *up, conv_norm_out, conv_act, conv_out), so every UNet tensor appears twice.
UNET_PREFIX, MID_PREFIX = "body.1.", "body.2."


def _alias_targets(config: AdcSRConfig) -> list[str]:
    n_down, n_up = len(config.down_block_types), len(config.up_block_types)
    return ([f"down_blocks.{i}" for i in range(n_down)] + ["mid_block"]
            + [f"up_blocks.{i}" for i in range(n_up)] + ["conv_norm_out", "conv_act", "conv_out"])


def _strip_module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def official_state_dicts(model: AdcSR, conv_in: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """(net_params, halfDecoder) dicts in the official layout, for export and round-trip tests."""
    targets = _alias_targets(model.config)
    net: dict[str, torch.Tensor] = {}
    for k, v in model.unet.state_dict().items():
        net[f"module.{UNET_PREFIX}{k}"] = v
        for i, t in enumerate(targets):
            if k.startswith(t + "."):
                net[f"module.{UNET_PREFIX}body.{i}.{k[len(t) + 1:]}"] = v
    for k, v in model.mid_block.state_dict().items():
        net[f"module.{MID_PREFIX}{k}"] = v
    dec = {f"decoder.mid_block.{k}": v for k, v in model.mid_block.state_dict().items()}
    dec.update({f"decoder.{k}": v for k, v in model.up.state_dict().items()})
    if conv_in is None:
        c = model.config.feature_channels
        conv_in = {"weight": torch.zeros(c, model.config.latent_channels, 3, 3), "bias": torch.zeros(c)}
    dec.update({f"decoder.conv_in.{k}": v for k, v in conv_in.items()})
    return net, {"state_dict": dec}


def load_official(model: AdcSR, net_params: str | Path | dict | None = None,
                  half_decoder: str | Path | dict | None = None) -> dict[str, Any]:
    """Load official AdcSR weights into ``model`` (strict); return what was not used.

    ``net_params``: ``net_params_*.pkl`` (UNet + trained decoder mid-block, ``module.`` prefix,
    aliased ``body.1.body.N`` keys are checked equal to their canonical twins and skipped).
    ``half_decoder``: ``halfDecoder.ckpt`` (``{"state_dict": {"decoder.*": ...}}``): supplies the
    frozen up path and, when ``net_params`` is not given, the mid-block. Its ``conv_in`` (used
    only on the teacher and ground-truth paths in training) is returned under ``"conv_in"``.
    """
    new: dict[str, torch.Tensor] = {}
    unused: dict[str, Any] = {"conv_in": {}}
    if half_decoder is not None:
        name = str(half_decoder) if not isinstance(half_decoder, dict) else "halfDecoder state dict"
        raw = half_decoder if isinstance(half_decoder, dict) else safe_torch_load(half_decoder)
        if not isinstance(raw, dict) or "state_dict" not in raw:
            raise AdcError(f"{name}: expected a dict with a 'state_dict' key (halfDecoder.ckpt layout)")
        for k, v in raw["state_dict"].items():
            if not k.startswith("decoder."):
                continue
            k = k[len("decoder."):]
            if k.startswith("conv_in."):
                unused["conv_in"][k[len("conv_in."):]] = v
            elif k.startswith("mid_block."):
                new["mid_block." + k[len("mid_block."):]] = v
            else:
                new["up." + k] = v
    if net_params is not None:
        name = str(net_params) if not isinstance(net_params, dict) else "net_params state dict"
        raw = net_params if isinstance(net_params, dict) else safe_torch_load(net_params)
        if not isinstance(raw, dict):
            raise AdcError(f"{name}: expected a state dict (net_params_*.pkl layout)")
        sd = _strip_module(raw)
        targets = _alias_targets(model.config)
        canonical = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX) and not k.startswith(UNET_PREFIX + "body.")}
        for k, v in sd.items():
            if k.startswith(UNET_PREFIX + "body."):
                idx, _, rest = k[len(UNET_PREFIX + "body."):].partition(".")
                if not idx.isdigit() or int(idx) >= len(targets):
                    raise AdcError(f"{name}: unexpected key {k!r}")
                twin = f"{UNET_PREFIX}{targets[int(idx)]}.{rest}"
                if twin not in canonical or (not v.is_meta and not torch.equal(canonical[twin], v)):
                    raise AdcError(f"{name}: aliased key {k!r} differs from {twin!r}")
            elif k.startswith(UNET_PREFIX):
                new["unet." + k[len(UNET_PREFIX):]] = v
            elif k.startswith(MID_PREFIX):
                new["mid_block." + k[len(MID_PREFIX):]] = v
            else:
                raise AdcError(f"{name}: unexpected key {k!r} (expected body.1.* or body.2.*)")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(new))
    extra = sorted(set(new) - set(expected))
    if extra:
        raise AdcError(f"checkpoint has keys the AdcSR model lacks, e.g. {extra[0]!r} ({len(extra)} in all)")
    if missing:
        raise AdcError(f"checkpoint lacks AdcSR keys, e.g. {missing[0]!r} ({len(missing)} in all)")
    for k, v in new.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AdcError(f"checkpoint key {k!r} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    model.load_state_dict(new, strict=True, assign=any(p.is_meta for p in model.parameters()))
    return unused
