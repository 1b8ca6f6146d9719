"""``remove`` and ``prune``: the structural half of ADC, driven by the analysis plan.

``remove`` turns the teacher's parts (the family's denoiser and decoder) into a dense student
that already runs LR -> SR: what the plan removes goes (cross-attention of a dropped prompt),
what it folds is folded exactly at the plan's constants or deleted as AdcSR does (``time``), the
re-encoder the plan found is replaced by PixelUnshuffle, the denoiser's ``conv_in``/``conv_out``
are widened by repetition to the new interfaces, and it feeds the decoder's mid-block
directly. ``prune`` then narrows the decoder and the denoiser, with the plan's interfaces and
its dependency graphs. Every step is a :mod:`compress.prune` call whose record goes into the
part's chain, so :func:`compress.student.load_student` rebuilds the result in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import AdcError
from ..prune import ChannelPruneConfig, SliceConfig
from ..config import ranged


# --------------------------------------------------------------------------------------------
# remove
# --------------------------------------------------------------------------------------------
@dataclass
class RemoveConfig:
    time: Literal["delete", "fold"] = "delete"      # what happens to the plan's foldable time branch
    input_stem: Literal["pixel_unshuffle"] = "pixel_unshuffle"  # replaces the re-encoder the plan found
    unshuffle: int | None = ranged(None, 1, 16)                     # None: the plan's input/latent size ratio
    init: str = "base"                               # base | teacher | random (the family says which exist)

    def validate(self, path: str) -> None:
        if self.unshuffle is not None and self.unshuffle < 1:
            raise AdcError(f"{path}.unshuffle: expected a positive integer, got {self.unshuffle}")


def check_remove(recipe, config: RemoveConfig, path: str) -> None:
    choices = recipe.family.init_choices()
    if config.init not in choices:
        raise AdcError(f"{path}.init: {config.init!r} is not one of {', '.join(map(repr, choices))} "
                       f"(family {recipe.models.family})")
    if recipe.task.prompt != "dropped":
        raise AdcError(f"{path}: task.prompt is {recipe.task.prompt!r}; the AdcSR-style student takes no prompt "
                       "(set task.prompt: dropped)")


def _plan_part(bundle, path: str):
    from .analyse import load_plan

    plan = load_plan(bundle)
    return None if plan is None else plan.part(path)


def _unshuffle(bundle, config: RemoveConfig) -> int:
    if config.unshuffle is not None:
        return config.unshuffle
    from .analyse import load_plan

    plan = load_plan(bundle)
    re = (plan.reencoder if plan is not None else {}) or {}
    x, a = re.get("input_shape"), re.get("output_shape")
    if x and a and len(x) == 4 and len(a) == 4 and a[2] and x[2] % a[2] == 0:
        return x[2] // a[2]
    bundle.note("remove: no re-encoder in the analysis plan (or no analyse stage): PixelUnshuffle(2) as AdcSR")
    return 2


def _what(rec) -> str:
    """What a record changed, for the report (``16 -> 12 input channels``; the module is named beside it)."""
    if rec.op == "widen_module" and rec.changes:
        b, a = rec.changes[0].before, rec.changes[0].after
        sides = [f"{b[k]} -> {a[k]} {k.split('_')[0]}put channels" for k in ("in_channels", "out_channels")
                 if k in b and b.get(k) != a.get(k)]
        return ", ".join(sides) or "unchanged"
    if rec.op == "remove_conditioning":
        return f"drops {', '.join(rec.args.get('drop', []))} ({len(rec.changes)} modules)"
    if rec.op == "slice_width":
        return f"leading {rec.args.get('ratio_keep')} of every width"
    if rec.op == "prune_channels":
        ratio = ((rec.args.get("config") or {}).get("pruning_ratio"))
        return f"channel groups, ratio {ratio}" if ratio is not None else "channel groups"
    return ", ".join(f"{k}={v}" for k, v in rec.args.items() if isinstance(v, (int, float, str)))[:80]


def _record_rows(records: list, part: str, offset: int) -> list[dict[str, Any]]:
    """One row per transformation of ``part``: its own params and the whole student's (``offset``: what the
    student holds outside this part), so every section of the report counts the same thing."""
    return [{"op": rec.op, "module": rec.args["name"] if rec.op == "widen_module" else "", "part": part,
             "what": _what(rec), "params_before": rec.params_before, "params_after": rec.params_after,
             "student_params_before": rec.params_before + offset, "student_params_after": rec.params_after + offset}
            for rec in records]


def run_remove(bundle, config: RemoveConfig, stage_dir: Path) -> dict[str, Any]:
    from ..prune import fold_timestep, remove_conditioning, widen_module
    from ..student import StudentState, compose_student

    family, task = bundle.family, bundle.recipe.task
    torch.manual_seed(bundle.recipe.seed)
    parts = family.student_parts(bundle.size, bundle.weights, config.init, bundle.teacher)
    unet, decoder = parts.denoiser.module, parts.decoder.module
    chain, dec_chain = [parts.denoiser.base], [parts.decoder.base]
    part = _plan_part(bundle, parts.denoiser.path)
    dec_part = _plan_part(bundle, parts.decoder.path)
    if dec_part is not None and (dec_part.remove or dec_part.fold):
        d = (dec_part.remove or dec_part.fold)[0]
        raise AdcError(f"remove: the plan {d.action}s {parts.decoder.path}.{d.module} ({d.reason[:100]}); the "
                       "AdcSR-style student keeps the whole decoder")
    removed = part.names("remove") if part else None
    folded = part.names("fold") if part else None
    if config.time == "fold":
        unet, r = remove_conditioning(unet, drop=("cross_attention",), planned=removed, inplace=True)
        chain.append(r)
        unet, r = fold_timestep(unet, task.timestep, planned=folded, inplace=True)
    else:
        planned = None if part is None else removed + folded
        unet, r = remove_conditioning(unet, drop=("time", "cross_attention"), planned=planned, inplace=True)
    chain.append(r)
    r_unshuffle = _unshuffle(bundle, config)
    in_ch = 3 * r_unshuffle ** 2
    feature_ch = decoder.mid_block.resnets[0].conv1.in_channels
    for name, kw in (("conv_in", {"in_channels": in_ch}), ("conv_out", {"out_channels": feature_ch})):
        unet, r = widen_module(unet, name, inplace=True, **kw)
        chain.append(r)
    state = StudentState(compose_student(unet, decoder, r_unshuffle), decoder, {"unet": chain, "decoder": dec_chain},
                         {"source": parts.source, "family": family.name})
    bundle.set_student(state)
    if state.on_meta:
        bundle.note(f"remove: {parts.source} (nothing trainable; stages that train or evaluate are skipped)")
    return {"source": parts.source, "params": state.params(), "unshuffle": r_unshuffle,
            "structure_only": state.on_meta, "plan": "used" if part is not None else "none (no analyse stage)",
            "removed": [c.name for rec in chain[1:] for c in rec.changes][:50],
            "records": _record_rows(chain[1:], parts.denoiser.path, state.params() - _count(unet))}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


# --------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------
@dataclass
class PartPrune:
    method: Literal["slice", "channels", "none"] = "slice"
    slice: SliceConfig = field(default_factory=SliceConfig)
    channels: ChannelPruneConfig = field(default_factory=ChannelPruneConfig)
    # importance: taylor (UNet only): degraded crops of data.train_hr whose gradients rank the channels
    calibration_images: int = ranged(8, 1, 100000)

    def validate(self, path: str) -> None:
        if self.calibration_images < 2 or self.calibration_images % 2:
            raise AdcError(f"{path}.calibration_images: expected an even number >= 2, got {self.calibration_images}")


@dataclass
class PruneConfig:
    """``slice`` = AdcSR's layer-wise leading slice; ``channels`` = dependency-aware torch-pruning."""

    unet: PartPrune = field(default_factory=PartPrune)
    decoder: PartPrune = field(default_factory=lambda: PartPrune(method="channels",
                                                                  channels=ChannelPruneConfig(pruning_ratio=0.5)))

    def validate(self, path: str) -> None:
        if self.decoder.method == "channels" and self.decoder.channels.importance == "taylor":
            raise AdcError(f"{path}.decoder.channels.importance: taylor is for the unet (its loss is the "
                           "distillation's feature L1); choose magnitude or slice for the decoder")


def run_prune_needs(bundle, config: PruneConfig) -> list[str]:
    taylor = config.unet.method == "channels" and config.unet.channels.importance == "taylor"
    needed = taylor and not bundle.recipe.data.train_hr and bundle.has_teacher_weights()  # meta: no values to rank
    return ["data.train_hr (calibration images for importance: taylor)"] if needed else []


def _taylor_calibration(bundle, decoder: nn.Module, unshuffle: int, images: int):
    """``(batches, loss_fn)`` for ``importance: taylor`` on the student UNet.

    The channels are ranked by the gradients of the loss distillation will minimise: L1 between
    the student's decoder mid-block features and the teacher's, on ``images`` LR crops of the
    training images (``task.lr_size``, degraded as in distillation, two per batch).
    """
    import copy

    from ..data import RealESRGANDegradation
    from ..recover.decoder_pretrain import hr_crops
    from ..recover.distill import DecoderFeatures, TeacherFeatures

    recipe, dev = bundle.recipe, next(decoder.parameters()).device
    teacher = bundle.teacher()
    parts = bundle.family.distill_parts(teacher, bundle.size, bundle.weights, bundle.options)
    feats = TeacherFeatures(teacher, parts.teacher_latent, parts.decode_input, DecoderFeatures(decoder)).eval()
    crops = hr_crops(list(recipe.data.train_hr), recipe.task.lr_size * recipe.task.scale, False, recipe.seed)
    degrade = RealESRGANDegradation(recipe.data.degradation)
    mid = copy.deepcopy(decoder.mid_block).requires_grad_(False)
    down = nn.PixelUnshuffle(unshuffle)
    current: dict[str, torch.Tensor] = {}

    def batches():
        for i in range(0, images, 2):
            hr = torch.stack([crops[j % len(crops)] for j in (i, i + 1)])
            lr = torch.cat([degrade(hr[k:k + 1], seed=recipe.seed * 100_003 + i + k) for k in range(2)]) * 2 - 1
            with torch.no_grad():
                current["target"] = feats(lr.to(dev))
            yield down(lr.to(dev))

    def loss_fn(out: torch.Tensor, _batch) -> torch.Tensor:
        return (mid(out, None) - current["target"]).abs().mean()

    return batches, loss_fn


def _prune_part(bundle, model: nn.Module, part: PartPrune, path: str, example: torch.Tensor, chain: list,
                calibration=None) -> nn.Module:
    from dataclasses import replace

    from ..prune import prune_channels, slice_width

    if part.method == "slice":
        model, r = slice_width(model, part.slice.ratio_keep, part.slice.gn_policy, part.slice.divisors,
                               part.slice.attention_scale, inplace=True)
    elif part.method == "channels":
        cfg, graph = part.channels, None
        plan_part = _plan_part(bundle, path)
        if plan_part is not None:
            # The plan's interfaces and kept layers; its dependency graph, rebound to this module.
            cfg = replace(cfg, interfaces={**plan_part.interfaces} or cfg.interfaces,
                          ignore=tuple(cfg.ignore) + tuple(plan_part.kept))
            graph = bundle.plan.take_graph(path, model)
        on_meta = any(t.is_meta for t in model.parameters())  # prune_channels ranks nothing on meta
        batches, loss_fn = calibration() if cfg.importance == "taylor" and calibration and not on_meta else (None, None)
        with torch.enable_grad():  # taylor accumulates gradients
            model, r = prune_channels(model, cfg, example, graph=graph, importance_batches=batches, loss_fn=loss_fn, inplace=True)
        model.zero_grad(set_to_none=True)
    else:
        return model
    chain.append(r)
    return model


def run_prune(bundle, config: PruneConfig, stage_dir: Path) -> dict[str, Any]:
    from ..prune import presliced_width, widen_module

    state = bundle.student_state()
    family = bundle.family
    unet_chain, dec_chain = list(state.chains["unet"]), list(state.chains["decoder"])
    before = state.params()
    unshuffle = state.model.config.unshuffle
    decoder, unet = state.decoder, state.model.unet
    dev = next(decoder.parameters()).device
    latent = torch.randn(1, decoder.conv_in.in_channels, 8, 8, device=dev)
    decoder = _prune_part(bundle, decoder, config.decoder, family.decoder_path, latent, dec_chain)
    feature_ch = decoder.mid_block.resnets[0].conv1.in_channels

    in_ch = unet.conv_in.in_channels
    if config.unet.method == "slice":  # widen the interfaces so that the slice lands on them (AdcSR's 16 / 342)
        k = config.unet.slice.ratio_keep
        targets = (("conv_in", {"in_channels": presliced_width(in_ch, k)}),
                   ("conv_out", {"out_channels": presliced_width(feature_ch, k)}))
    else:
        targets = (("conv_out", {"out_channels": feature_ch}),)
    for name, kw in targets:
        unet, r = widen_module(unet, name, inplace=True, **kw)
        unet_chain.append(r)
    example = torch.randn(1, in_ch, 16, 16, device=dev)
    unet = _prune_part(bundle, unet, config.unet, family.denoiser_path, example, unet_chain,
                       calibration=lambda: _taylor_calibration(bundle, decoder, unshuffle, config.unet.calibration_images))
    if unet.conv_in.in_channels != in_ch or unet.conv_out.out_channels != feature_ch:
        raise AdcError(f"stages.prune: the pruned UNet maps {unet.conv_in.in_channels}->{unet.conv_out.out_channels} "
                       f"channels, the student needs {in_ch}->{feature_ch}")
    from ..student import StudentState, compose_student

    pruned = StudentState(compose_student(unet, decoder, unshuffle, state.model.color_fix), decoder,
                          {"unet": unet_chain, "decoder": dec_chain}, state.info)
    bundle.set_student(pruned)
    # whole-student params per record: the decoder is pruned first, then the UNet (widened, then narrowed)
    dec_new, unet_new = dec_chain[len(state.chains["decoder"]):], unet_chain[len(state.chains["unet"]):]
    outside_unet = pruned.params() - _count(unet)  # the decoder's mid-block + up path the student runs
    records = _record_rows(unet_new, family.denoiser_path, outside_unet)
    if dec_new:
        after_dec = (unet_new[0].params_before if unet_new else _count(unet)) + outside_unet
        records = [{**_record_rows(dec_new, family.decoder_path, 0)[0], "student_params_before": before,
                    "student_params_after": after_dec}] + records
    return {"params_before": before, "params_after": pruned.params(), "records": records,
            "unet_widths": list(pruned.model.config.unet_block_out_channels),
            "decoder_widths": list(pruned.model.config.decoder_block_out_channels),
            "graphs": {p: ("the analysis plan's" if r.extra.get("graph") == "the analysis plan's" else "traced here")
                       for p, r in (("unet", unet_chain[-1]), ("decoder", dec_chain[-1])) if r.op == "prune_channels"}}
