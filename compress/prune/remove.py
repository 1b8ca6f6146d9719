"""Remove or replace modules by name, and strip a UNet's timestep and text conditioning.

Patterns are globs on dotted module names (``"*.attn2"``) or regular expressions after
``"re:"`` (``"re:.*resnets\\.\\d+\\.time_emb_proj"``). A pattern that selects nothing is an
error: a silent no-op would hide a typo or a model that is not the one the recipe assumes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import AdcError
from ..zoo.unet import ConditionFreeUNet
from ._common import (Constant, ModuleChange, ModuleSpec, TransformRecord, as_list, count_params, describe,
                      match_names, outermost, qualname, swap_modules, working_copy)

Replacement = Any  # None | "identity" | torch.Tensor | nn.Module | ModuleSpec


def _replacement_factory(replacement: Replacement) -> tuple[Any, dict[str, Any]]:
    """(callable making one replacement per match, JSON description for the record)."""
    if replacement is None or replacement == "none":
        return (lambda: None), {"kind": "none"}
    if isinstance(replacement, str):
        if replacement == "identity":
            return nn.Identity, {"kind": "identity"}
        raise AdcError(f"replacement {replacement!r}: expected None, 'identity', a tensor, a module or a ModuleSpec")
    if torch.is_tensor(replacement):
        value = replacement.detach()
        return (lambda: Constant(value)), {"kind": "constant", "shape": list(value.shape),
                                           "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(replacement, ModuleSpec):
        replacement.build()  # fail now, not on the n-th match
        return replacement.build, {"kind": "spec", "target": replacement.target, "kwargs": dict(replacement.kwargs)}
    if isinstance(replacement, dict) and "kind" in replacement:  # a record's own description (replay)
        return _from_description(replacement)
    if isinstance(replacement, nn.Module):
        import copy

        return (lambda: copy.deepcopy(replacement)), {"kind": "module", "type": qualname(replacement),
                                                      "replayable": False}
    raise AdcError(f"replacement of type {type(replacement).__name__}: expected None, 'identity', a tensor, "
                   "a module or a ModuleSpec")


def _from_description(d: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    kind = d["kind"]
    if kind in ("none", "identity"):
        return _replacement_factory(None if kind == "none" else "identity")
    if kind == "constant":
        dtype = getattr(torch, d["dtype"])
        return _replacement_factory(torch.zeros(d["shape"], dtype=dtype))
    if kind == "spec":
        return _replacement_factory(ModuleSpec(d["target"], d.get("kwargs", {})))
    raise AdcError(f"replacement {d!r} cannot be rebuilt (a module instance was given; use a ModuleSpec)")


def remove_modules(model: nn.Module, patterns: str | Sequence[str], replacement: Replacement = None, *,
                   inplace: bool = False) -> tuple[nn.Module, TransformRecord]:
    """Replace every module matching any of ``patterns`` and return ``(new_model, record)``.

    ``replacement``: ``None`` (attribute set to ``None``: for optional diffusers members such as
    ``time_emb_proj``/``attn2`` whose forward skips them), ``"identity"``, a tensor (a
    :class:`Constant` returning it), a module (deep-copied per match; not replayable from the
    record) or a :class:`ModuleSpec` (replayable). Matches inside another match are skipped.
    ``model`` is left unchanged (a copy is edited) unless ``inplace``.
    """
    pats = as_list(patterns)
    if not pats:
        raise AdcError("remove_modules: no pattern given")
    make, desc = _replacement_factory(replacement)
    names: list[str] = []
    for p in pats:
        names += match_names(model, p, where=f"remove_modules pattern {p!r}")
    names = outermost(names)
    model = working_copy(model, inplace)
    before = count_params(model)
    mapping: dict[nn.Module, nn.Module | None] = {}
    changes = []
    for name in names:
        old = model.get_submodule(name)
        new = make()
        mapping[old] = new
        changes.append(ModuleChange(name, "removed" if new is None else "replaced", describe(old), describe(new)))
    swap_modules(model, mapping)
    return model, TransformRecord("remove_modules", {"patterns": pats, "replacement": desc}, before,
                                  count_params(model), changes)


_TIME_TOP = ("time_proj", "time_embedding", "class_embedding", "add_time_proj", "add_embedding", "time_embed_act")
DROPPABLE = ("time", "cross_attention")


def check_planned(op: str, done: Sequence[str], planned: Sequence[str] | None) -> None:
    """The modules an op touches must be exactly the ones the analysis plan names (both outermost)."""
    if planned is None:
        return
    done_set, plan_set = set(outermost(list(done))), set(outermost(list(planned)))
    extra = sorted(plan_set - done_set)
    if extra:
        raise AdcError(f"{op}: the plan asks to change {extra[0]!r}, which {op} does not handle "
                       f"({len(extra)} such modules)")
    missing = sorted(done_set - plan_set)
    if missing:
        raise AdcError(f"{op} would also change {missing[0]!r}, which the plan keeps ({len(missing)} such modules; "
                       "see the analysis report for why, or keep/remove it with analyse.keep)")


def conditioning_targets(unet: nn.Module, drop: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of everything :func:`remove_conditioning` removes for ``drop``, in model order."""
    out: list[tuple[str, nn.Module]] = []
    if "time" in drop:
        if getattr(getattr(unet, "config", None), "addition_embed_type", None) == "image_hint":
            raise AdcError("remove_conditioning: this UNet concatenates a hint image to its input; not supported")
        for attr in _TIME_TOP:
            m = getattr(unet, attr, None)
            if isinstance(m, nn.Module):
                out.append((attr, m))
        for name, m in unet.named_modules():
            if type(m).__name__ == "ResnetBlockCondNorm2D":
                raise AdcError(f"remove_conditioning: {name!r} normalises with the time embedding "
                               "(ResnetBlockCondNorm2D); it cannot run without it")
            if isinstance(getattr(m, "time_emb_proj", None), nn.Module):
                out.append((f"{name}.time_emb_proj", m.time_emb_proj))
    if "cross_attention" in drop:
        for name, m in unet.named_modules():
            if isinstance(getattr(m, "attn2", None), nn.Module):
                if getattr(m, "only_cross_attention", False):
                    raise AdcError(f"remove_conditioning: {name!r} has only cross-attention; removing it "
                                   "would leave no attention")
                out.append((f"{name}.attn2", m.attn2))
                if isinstance(getattr(m, "norm2", None), nn.Module):
                    out.append((f"{name}.norm2", m.norm2))
        if isinstance(getattr(unet, "encoder_hid_proj", None), nn.Module):
            out.append(("encoder_hid_proj", unet.encoder_hid_proj))
    return out


def remove_conditioning(unet: nn.Module, drop: Sequence[str] = DROPPABLE, planned: Sequence[str] | None = None,
                        *, inplace: bool = False) -> tuple[nn.Module, TransformRecord]:
    """Remove the timestep branch and/or cross-attention from a diffusers UNet.

    ``"time"``: ``time_proj``, ``time_embedding`` (and class/added embeddings) and every
    ``time_emb_proj``; the result is a :class:`ConditionFreeUNet` (same parameter names) that runs
    the blocks with ``temb=None``. That equals the original only where the time branch is
    constant and negligible; :func:`compress.prune.fold.fold_timestep` keeps it exactly instead.
    ``"cross_attention"``: every ``attn2`` and its ``norm2``. With ``"time"`` kept the diffusers
    model is returned (call it with ``encoder_hidden_states=None``). ``unet`` itself still runs as
    before: a copy is edited, unless ``inplace`` (then its modules are reused: use only the
    returned model afterwards). ``planned``: the module names
    (relative to ``unet``) an analysis plan removes; they must be exactly the ones this call
    removes (an :class:`AdcError` names the first difference, before anything changes).
    """
    drop = tuple(as_list(drop))
    bad = [d for d in drop if d not in DROPPABLE]
    if bad or not drop:
        raise AdcError(f"remove_conditioning drop={list(drop)!r}: expected a non-empty subset of {list(DROPPABLE)}")
    for attr in ("conv_in", "down_blocks", "up_blocks", "conv_out"):
        if not hasattr(unet, attr):
            raise AdcError(f"remove_conditioning: {type(unet).__name__} is not a diffusers-style UNet (no {attr!r})")
    targets = conditioning_targets(unet, drop)
    check_planned("remove_conditioning", [n for n, _ in targets], planned)
    if not inplace:
        unet = working_copy(unet, False)
        targets = conditioning_targets(unet, drop)
    before = count_params(unet)
    changes: list[ModuleChange] = []
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        changes.append(ModuleChange(name, "removed", describe(module), describe(None)))
        if parent_name or attr == "encoder_hid_proj":  # top-level time modules stay; ConditionFreeUNet drops them
            setattr(parent, attr, None)
        if attr == "time_emb_proj" and getattr(parent, "time_embedding_norm", "default") == "scale_shift":
            # without temb, scale-shift modulation is h * (1 + 0) + 0: the plain norm
            parent.time_embedding_norm = "default"
            changes.append(ModuleChange(parent_name, "attribute", {"time_embedding_norm": "scale_shift"},
                                        {"time_embedding_norm": "default"}))
    if not changes:
        raise AdcError(f"remove_conditioning drop={list(drop)!r}: nothing to remove (already removed?)")
    out = unet
    if "time" in drop and not isinstance(unet, ConditionFreeUNet):
        out = ConditionFreeUNet.from_unet(unet)
    return out, TransformRecord("remove_conditioning", {"drop": list(drop)}, before, count_params(out), changes,
                                {"result": type(out).__name__})


__all__ = ["remove_modules", "remove_conditioning", "conditioning_targets", "check_planned", "Constant", "ModuleSpec",
           "DROPPABLE"]
