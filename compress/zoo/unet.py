"""A UNet with neither timestep nor text conditioning, made of the diffusers blocks.

AdcSR runs its UNet at a fixed timestep with no prompt. Instead of patching diffusers'
forwards (as the official code does, with a module-global skip list), this module owns the
same submodules under the same names as ``UNet2DConditionModel`` (so checkpoints keep their
keys) and calls each block with ``temb=None`` and no ``encoder_hidden_states``; the diffusers
blocks natively skip ``time_emb_proj`` and ``attn2`` when those are ``None``.
"""

from __future__ import annotations

import torch
from torch import nn


class ConditionFreeUNet(nn.Module):
    """conv_in -> down blocks -> mid block -> up blocks (with skips) -> norm/act/conv_out."""

    def __init__(self, conv_in: nn.Module, down_blocks: nn.ModuleList, mid_block: nn.Module | None,
                 up_blocks: nn.ModuleList, conv_norm_out: nn.Module | None, conv_act: nn.Module | None,
                 conv_out: nn.Module):
        super().__init__()
        self.conv_in = conv_in
        self.down_blocks = down_blocks
        self.mid_block = mid_block
        self.up_blocks = up_blocks
        self.conv_norm_out = conv_norm_out
        self.conv_act = conv_act
        self.conv_out = conv_out

    @classmethod
    def from_unet(cls, unet: nn.Module) -> "ConditionFreeUNet":
        """Wrap the blocks of a ``UNet2DConditionModel`` (shared, not copied).

        The caller removes the conditioning modules first (``time_emb_proj``, ``attn2``,
        ``norm2``); :func:`check_condition_free` says which are left.
        """
        return cls(unet.conv_in, unet.down_blocks, unet.mid_block, unet.up_blocks,
                   unet.conv_norm_out, unet.conv_act, unet.conv_out)

    def forward(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """``encoder_hidden_states`` reaches only blocks that still have cross-attention (``attn2``),
        e.g. after folding the timestep but keeping the text path; AdcSR's UNet has none."""
        up_factor = 2 ** sum(1 for b in self.up_blocks if getattr(b, "upsamplers", None) is not None)
        forward_size = any(d % up_factor for d in sample.shape[-2:])
        text = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}

        sample = self.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            extra = text if getattr(block, "has_cross_attention", False) else {}
            sample, res = block(hidden_states=sample, temb=None, **extra)
            skips += res
        if self.mid_block is not None:
            extra = text if getattr(self.mid_block, "has_cross_attention", False) else {}
            sample = self.mid_block(sample, None, **extra)
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if (forward_size and i < len(self.up_blocks) - 1) else None
            extra = text if getattr(block, "has_cross_attention", False) else {}
            sample = block(hidden_states=sample, res_hidden_states_tuple=res, temb=None, upsample_size=size, **extra)
        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        return self.conv_out(sample)


def conditioning_modules(module: nn.Module) -> list[str]:
    """Names of the timestep/text-conditioning modules still present (must be empty to run)."""
    left = []
    for name, m in module.named_modules():
        for attr in ("time_emb_proj", "attn2", "norm2"):
            if attr == "norm2" and not hasattr(m, "attn2"):
                continue  # ResnetBlock2D.norm2 is an ordinary norm
            if getattr(m, attr, None) is not None and isinstance(getattr(m, attr), nn.Module):
                left.append(f"{name}.{attr}" if name else attr)
    return left


def strip_conditioning(module: nn.Module) -> list[str]:
    """Set every ``time_emb_proj``, ``attn2`` and transformer ``norm2`` to ``None``; return their names."""
    removed = conditioning_modules(module)
    for name in removed:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, None)
    return removed
