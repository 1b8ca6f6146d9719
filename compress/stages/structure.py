"""``remove`` and ``prune``: the structural half of ADC, as recorded transformations.

``remove`` turns the teacher's parts into a dense student that already runs LR -> SR:
PixelUnshuffle replaces the VAE encoder, the UNet loses its time branch (deleted as AdcSR does,
or folded exactly at the task's timestep) and its cross-attention (the prompt is dropped), its
``conv_in``/``conv_out`` are widened by repetition to the new interfaces, and it feeds the VAE
decoder's mid-block directly. ``prune`` then narrows the decoder and the UNet. Every step is a
:mod:`compress.prune` call whose record goes into the saved chain, so ``load_student`` rebuilds
the result from the base configs in one call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import AdcError
from ..prune import ChannelPruneConfig, SliceConfig


# --------------------------------------------------------------------------------------------
# remove
# --------------------------------------------------------------------------------------------
@dataclass
class RemoveConfig:
    time: Literal["delete", "fold"] = "delete"          # AdcSR deletes; fold keeps the t=999 bias exactly
    cross_attention: Literal["delete"] = "delete"      # the compressed model takes no prompt
    input_stem: Literal["pixel_unshuffle"] = "pixel_unshuffle"  # replaces the VAE encoder
    unshuffle: int = 2
    init: Literal["sd21_base", "teacher", "random"] = "sd21_base"  # where the student's weights come from

    def validate(self, path: str) -> None:
        if self.unshuffle < 1:
            raise AdcError(f"{path}.unshuffle: expected a positive integer, got {self.unshuffle}")


def run_remove_needs(bundle, config: RemoveConfig) -> list[str]:
    return []  # without weights the structure is built on random init (enough for analysis and profiling)


def _source_parts(bundle, init: str) -> tuple[dict | None, dict | None, str]:
    """State dicts (unet, vae decoder) to start the student from, and a note on where they came from."""
    from ..zoo.sd import load_sd_components

    if init == "random":
        return None, None, "random init (init: random)"
    if init == "teacher" or bundle.size == "tiny":
        teacher = copy.deepcopy(bundle.teacher()).cpu()
        if teacher.has_lora:
            teacher.merge_lora()
        return teacher.unet.state_dict(), teacher.vae.decoder.state_dict(), "the teacher (LoRA merged)"
    path = bundle.recipe.models.sd21_base
    if path is None:
        return None, None, "random init: models.sd21_base not given (structure only; train with real weights)"
    parts = load_sd_components(path, ("unet", "vae"))
    return parts["unet"].state_dict(), parts["vae"].decoder.state_dict(), f"SD 2.1-base at {path}"


def run_remove(bundle, config: RemoveConfig, stage_dir: Path) -> dict[str, Any]:
    from ..prune import base_model, fold_timestep, remove_conditioning, widen_module
    from ..student import compose_student, save_student

    size, task = bundle.size, bundle.recipe.task
    if task.prompt != "dropped":
        raise AdcError(f"stages.remove: task.prompt is {task.prompt!r}; the AdcSR student drops the prompt "
                       "(set task.prompt: dropped)")
    torch.manual_seed(bundle.recipe.seed)
    unet, r_base = base_model("compress.zoo.sd:build_unet", size=size)
    decoder, d_base = base_model("compress.zoo.sd:build_vae_decoder", size=size)
    unet_sd, dec_sd, source = _source_parts(bundle, config.init)
    if unet_sd is not None:
        unet.load_state_dict(unet_sd)
        decoder.load_state_dict(dec_sd)
    chain = [r_base]
    if config.time == "fold":
        unet, r = remove_conditioning(unet, drop=("cross_attention",))
        chain.append(r)
        unet, r = fold_timestep(unet, task.timestep)
    else:
        unet, r = remove_conditioning(unet, drop=("time", "cross_attention"))
    chain.append(r)
    in_ch = 3 * config.unshuffle**2
    feature_ch = decoder.mid_block.resnets[0].conv1.in_channels
    for name, kw in (("conv_in", {"in_channels": in_ch}), ("conv_out", {"out_channels": feature_ch})):
        unet, r = widen_module(unet, name, **kw)
        chain.append(r)
    student = compose_student(unet, decoder, config.unshuffle)
    out = save_student(stage_dir / "student", student, chain, decoder, [d_base], {"source": source})
    params = sum(p.numel() for p in student.parameters())
    return {"student": str(out), "source": source, "params": params,
            "removed": [c.name for rec in chain[1:] for c in rec.changes][:50],
            "records": [{"op": rec.op, "params_before": rec.params_before, "params_after": rec.params_after}
                        for rec in chain[1:]]}


# --------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------
@dataclass
class PartPrune:
    method: Literal["slice", "channels", "none"] = "slice"
    slice: SliceConfig = field(default_factory=SliceConfig)
    channels: ChannelPruneConfig = field(default_factory=ChannelPruneConfig)


@dataclass
class PruneConfig:
    """``slice`` = AdcSR's layer-wise leading slice; ``channels`` = dependency-aware torch-pruning."""

    unet: PartPrune = field(default_factory=PartPrune)
    decoder: PartPrune = field(default_factory=lambda: PartPrune(method="channels",
                                                                  channels=ChannelPruneConfig(pruning_ratio=0.5)))


def run_prune_needs(bundle, config: PruneConfig) -> list[str]:
    return []


def _prune_part(model: nn.Module, part: PartPrune, example: torch.Tensor, chain: list) -> nn.Module:
    from ..prune import prune_channels, slice_width

    if part.method == "slice":
        model, r = slice_width(model, part.slice.ratio_keep, part.slice.gn_policy, part.slice.divisors,
                               part.slice.attention_scale)
    elif part.method == "channels":
        model, r = prune_channels(model, part.channels, example)
    else:
        return model
    chain.append(r)
    return model


def run_prune(bundle, config: PruneConfig, stage_dir: Path) -> dict[str, Any]:
    from ..prune import presliced_width, widen_module
    from ..student import compose_student, load_student, read_chain, save_student

    src = bundle.student_dir()
    student, decoder = load_student(src)
    unet_chain, dec_chain = read_chain(src / "unet"), read_chain(src / "decoder")
    before = sum(p.numel() for p in student.parameters())
    unshuffle = student.config.unshuffle

    latent = torch.randn(1, decoder.conv_in.in_channels, 8, 8)
    decoder = _prune_part(decoder, config.decoder, latent, dec_chain)
    feature_ch = decoder.mid_block.resnets[0].conv1.in_channels

    unet = student.unet
    in_ch = unet.conv_in.in_channels
    if config.unet.method == "slice":  # widen the interfaces so that the slice lands on them (AdcSR's 16 / 342)
        k = config.unet.slice.ratio_keep
        targets = (("conv_in", {"in_channels": presliced_width(in_ch, k)}),
                   ("conv_out", {"out_channels": presliced_width(feature_ch, k)}))
    else:
        targets = (("conv_out", {"out_channels": feature_ch}),)
    for name, kw in targets:
        unet, r = widen_module(unet, name, **kw)
        unet_chain.append(r)
    example = torch.randn(1, in_ch, 16, 16)
    unet = _prune_part(unet, config.unet, example, unet_chain)
    if unet.conv_in.in_channels != in_ch or unet.conv_out.out_channels != feature_ch:
        raise AdcError(f"stages.prune: the pruned UNet maps {unet.conv_in.in_channels}->{unet.conv_out.out_channels} "
                       f"channels, the student needs {in_ch}->{feature_ch}")
    pruned = compose_student(unet, decoder, unshuffle)
    out = save_student(stage_dir / "student", pruned, unet_chain, decoder, dec_chain)
    after = sum(p.numel() for p in pruned.parameters())
    return {"student": str(out), "params_before": before, "params_after": after,
            "unet_widths": list(pruned.config.unet_block_out_channels),
            "decoder_widths": list(pruned.config.decoder_block_out_channels)}
