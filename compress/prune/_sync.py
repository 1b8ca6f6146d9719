"""Static width attributes of diffusers blocks, brought in line with their (resized) weights.

Why: ``Upsample2D``/``Downsample2D`` assert ``x.shape[1] == self.channels`` in forward, and
``ResnetBlock2D``/``Transformer2DModel`` keep ``in_channels``/``out_channels`` that tools read.
"""

from __future__ import annotations

from torch import nn

from ._common import ModuleChange


def _conv_of(m: nn.Module) -> nn.Module | None:
    for attr in ("conv", "Conv2d_0", "op"):
        c = getattr(m, attr, None)
        if isinstance(c, nn.modules.conv._ConvNd):
            return c
    return None


def sync_samplers(model: nn.Module, ratio: float | None = None) -> list[ModuleChange]:
    """Set ``channels``/``out_channels`` of Up/Downsample blocks from their conv.

    A sampler without a conv (pooling, plain interpolation) passes its width through: with
    ``ratio`` (leading slice) the width is ``int(ratio * channels)``, otherwise it is left for the
    caller (channel pruning gives such samplers' widths from the dependency graph).
    """
    from diffusers.models.downsampling import Downsample1D, Downsample2D
    from diffusers.models.upsampling import Upsample1D, Upsample2D

    changes = []
    for name, m in model.named_modules():
        if not isinstance(m, (Downsample1D, Downsample2D, Upsample1D, Upsample2D)):
            continue
        before = {"channels": m.channels, "out_channels": m.out_channels}
        conv = _conv_of(m)
        if conv is not None:
            m.channels, m.out_channels = conv.in_channels, conv.out_channels
        elif ratio is not None:
            m.channels = m.out_channels = int(m.channels * ratio)
        after = {"channels": m.channels, "out_channels": m.out_channels}
        if after != before:
            changes.append(ModuleChange(name, "attribute", before, after))
    return changes


def sync_blocks(model: nn.Module) -> list[ModuleChange]:
    """``ResnetBlock2D`` and ``Transformer2DModel`` width attributes from their layers."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    changes = []
    for name, m in model.named_modules():
        if isinstance(m, ResnetBlock2D):
            before = {"in_channels": m.in_channels, "out_channels": m.out_channels}
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif isinstance(m, Transformer2DModel) and isinstance(getattr(m, "norm", None), nn.GroupNorm):
            before = {"in_channels": m.in_channels, "out_channels": m.out_channels, "inner_dim": m.inner_dim}
            m.in_channels = m.norm.num_channels
            proj_in, proj_out = m.proj_in, m.proj_out
            m.inner_dim = proj_in.out_features if isinstance(proj_in, nn.Linear) else proj_in.out_channels
            m.out_channels = proj_out.out_features if isinstance(proj_out, nn.Linear) else proj_out.out_channels
            after = {"in_channels": m.in_channels, "out_channels": m.out_channels, "inner_dim": m.inner_dim}
            if after != before:
                changes.append(ModuleChange(name, "attribute", before, after))
            continue
        else:
            continue
        after = {"in_channels": m.in_channels, "out_channels": m.out_channels}
        if after != before:
            changes.append(ModuleChange(name, "attribute", before, after))
    return changes
