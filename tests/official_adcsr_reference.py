"""An independent, purely functional statement of the official AdcSR forward.

It reads the official checkpoint layout (``net_params`` with ``module.body.1`` = UNet,
``module.body.2`` = decoder mid-block; ``halfDecoder`` ``decoder.*``) and runs the graph of
the official ``forward.py``/``test.py`` with ``torch.nn.functional`` only: an explicit skip
stack, ResNet = norm1-SiLU-conv1-norm2-SiLU-conv2 + shortcut, transformer = x + attn1(norm1 x),
x + ff(norm3 x), SDPA with the default 1/sqrt(head dim) scale. No diffusers block is used, so
agreement with :class:`compress.zoo.adcsr.AdcSR` checks our module graph, not diffusers twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.zoo.adcsr import AdcSRConfig, first_divisor


class _W:
    def __init__(self, sd: dict[str, torch.Tensor], prefix: str):
        self.sd, self.prefix = sd, prefix

    def __call__(self, name: str) -> torch.Tensor:
        return self.sd[self.prefix + name]

    def has(self, name: str) -> bool:
        return self.prefix + name in self.sd

    def sub(self, name: str) -> "_W":
        return _W(self.sd, self.prefix + name + ".")


def _conv(x, w: _W, name, stride=1):
    return F.conv2d(x, w(name + ".weight"), w(name + ".bias"), stride=stride, padding=w(name + ".weight").shape[-1] // 2)


def _gn(x, w: _W, name, groups, eps):
    return F.group_norm(x, groups, w(name + ".weight"), w(name + ".bias"), eps)


def _resnet(x, w: _W, groups_fn, eps):
    h = F.silu(_gn(x, w, "norm1", groups_fn(x.shape[1]), eps))
    h = _conv(h, w, "conv1")
    h = F.silu(_gn(h, w, "norm2", groups_fn(h.shape[1]), eps))
    h = _conv(h, w, "conv2")
    return h + (_conv(x, w, "conv_shortcut") if w.has("conv_shortcut.weight") else x)


def _linear(x, w: _W, name):
    return F.linear(x, w(name + ".weight"), w(name + ".bias") if w.has(name + ".bias") else None)


def _mha(x, w: _W, heads):
    b, n, _ = x.shape
    q, k, v = (_linear(x, w, p).view(b, n, heads, -1).transpose(1, 2) for p in ("to_q", "to_k", "to_v"))
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
    return _linear(o, w, "to_out.0")


def _transformer(x_in, w: _W, heads):
    b, c, h, wd = x_in.shape
    x = _gn(x_in, w, "norm", first_divisor(c), 1e-6)
    x = x.permute(0, 2, 3, 1).reshape(b, h * wd, c)
    x = _linear(x, w, "proj_in")
    blk = w.sub("transformer_blocks.0")
    x = x + _mha(F.layer_norm(x, (x.shape[-1],), blk("norm1.weight"), blk("norm1.bias")), blk.sub("attn1"), heads)
    y = F.layer_norm(x, (x.shape[-1],), blk("norm3.weight"), blk("norm3.bias"))
    hidden, gate = _linear(y, blk, "ff.net.0.proj").chunk(2, dim=-1)
    x = x + _linear(hidden * F.gelu(gate), blk, "ff.net.2")
    x = _linear(x, w, "proj_out")
    return x.reshape(b, h, wd, c).permute(0, 3, 1, 2) + x_in


def _unet(x, w: _W, cfg: AdcSRConfig):
    x = _conv(x, w, "conv_in")
    skip = [x]
    for i, kind in enumerate(cfg.down_block_types):
        blk = w.sub(f"down_blocks.{i}")
        for j in range(cfg.layers_per_block):
            x = _resnet(x, blk.sub(f"resnets.{j}"), first_divisor, 1e-5)
            if kind.startswith("CrossAttn"):
                x = _transformer(x, blk.sub(f"attentions.{j}"), cfg.unet_heads[i])
            skip.append(x)
        if blk.has("downsamplers.0.conv.weight"):
            x = _conv(x, blk, "downsamplers.0.conv", stride=2)
            skip.append(x)
    mid = w.sub("mid_block")
    x = _resnet(x, mid.sub("resnets.0"), first_divisor, 1e-5)
    x = _transformer(x, mid.sub("attentions.0"), cfg.unet_heads[-1])
    x = _resnet(x, mid.sub("resnets.1"), first_divisor, 1e-5)
    heads_up = tuple(reversed(cfg.unet_heads))
    for i, kind in enumerate(cfg.up_block_types):
        blk = w.sub(f"up_blocks.{i}")
        for j in range(cfg.layers_per_block + 1):
            x = _resnet(torch.cat([x, skip.pop()], dim=1), blk.sub(f"resnets.{j}"), first_divisor, 1e-5)
            if kind.startswith("CrossAttn"):
                x = _transformer(x, blk.sub(f"attentions.{j}"), heads_up[i])
        if blk.has("upsamplers.0.conv.weight"):
            x = _conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), blk, "upsamplers.0.conv")
    x = F.silu(_gn(x, w, "conv_norm_out", first_divisor(x.shape[1]), 1e-5))
    return _conv(x, w, "conv_out")


def _vae_attention(x, w: _W, groups):
    b, c, h, wd = x.shape
    y = _gn(x, w, "group_norm", groups, 1e-6).view(b, c, h * wd).transpose(1, 2)
    q, k, v = (_linear(y, w, p).unsqueeze(1) for p in ("to_q", "to_k", "to_v"))
    o = _linear(F.scaled_dot_product_attention(q, k, v).squeeze(1), w, "to_out.0")
    return o.transpose(1, 2).reshape(b, c, h, wd) + x


def _decoder_mid(x, w: _W, groups):
    g = lambda c: groups  # noqa: E731 - the VAE keeps a fixed group count
    x = _resnet(x, w.sub("resnets.0"), g, 1e-6)
    x = _vae_attention(x, w.sub("attentions.0"), groups)
    return _resnet(x, w.sub("resnets.1"), g, 1e-6)


def _decoder_up(x, w: _W, cfg: AdcSRConfig):
    g = lambda c: cfg.decoder_norm_groups  # noqa: E731
    for i in range(len(cfg.decoder_block_out_channels)):
        blk = w.sub(f"up_blocks.{i}")
        for j in range(3):
            x = _resnet(x, blk.sub(f"resnets.{j}"), g, 1e-6)
        if blk.has("upsamplers.0.conv.weight"):
            x = _conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), blk, "upsamplers.0.conv")
    x = F.silu(_gn(x, w, "conv_norm_out", cfg.decoder_norm_groups, 1e-6))
    return _conv(x, w, "conv_out")


@torch.no_grad()
def official_forward(lr: torch.Tensor, net_params: dict, half_decoder: dict, cfg: AdcSRConfig) -> torch.Tensor:
    """LR [-1,1] -> SR [-1,1] exactly as the official test script computes it (with colour match)."""
    sd = {k.removeprefix("module."): v for k, v in net_params.items()}
    x = F.pixel_unshuffle(lr, cfg.unshuffle)
    x = _unet(x, _W(sd, "body.1."), cfg)
    x = _decoder_mid(x, _W(sd, "body.2."), cfg.decoder_norm_groups)
    sr = _decoder_up(x, _W(half_decoder["state_dict"], "decoder."), cfg)
    sr_m, sr_s = sr.mean(dim=[2, 3], keepdim=True), sr.std(dim=[2, 3], keepdim=True)
    return (sr - sr_m) / sr_s * lr.std(dim=[2, 3], keepdim=True) + lr.mean(dim=[2, 3], keepdim=True)
