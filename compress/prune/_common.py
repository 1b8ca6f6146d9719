"""Shared pieces of the transformations: the record, name patterns, module surgery.

Every transformation returns ``(model, TransformRecord)``. The record is plain data (JSON via
:meth:`TransformRecord.to_dict`) holding the op name and the arguments needed to replay it
(:mod:`compress.prune.persist`), plus what changed, for reports. The caller's module is left
as it was unless ``inplace=True`` (:func:`working_copy`).
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import AdcError


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
@dataclass
class ModuleChange:
    """One module touched by a transformation: ``before``/``after`` hold its type and shapes."""

    name: str
    action: str  # removed | replaced | resized | folded | regrouped | attribute
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)


@dataclass
class TransformRecord:
    """What one transformation did, and the arguments that replay it on a fresh model."""

    op: str
    args: dict[str, Any] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    changes: list[ModuleChange] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, path: str = "record") -> "TransformRecord":
        if not isinstance(d, Mapping):
            raise AdcError(f"{path}: expected a mapping, got {type(d).__name__}")
        known = {"op", "args", "params_before", "params_after", "changes", "extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdcError(f"{path}.{unknown[0]}: unknown key (expected one of: {', '.join(sorted(known))})")
        if not isinstance(d.get("op"), str):
            raise AdcError(f"{path}.op: expected a string, got {d.get('op')!r}")
        for key in ("args", "extra"):
            if not isinstance(d.get(key, {}), Mapping):
                raise AdcError(f"{path}.{key}: expected a mapping")
        changes = []
        for i, c in enumerate(d.get("changes", [])):
            if not isinstance(c, Mapping) or not {"name", "action"} <= set(c):
                raise AdcError(f"{path}.changes[{i}]: expected a mapping with name and action")
            changes.append(ModuleChange(c["name"], c["action"], dict(c.get("before", {})), dict(c.get("after", {}))))
        return cls(d["op"], dict(d.get("args", {})), int(d.get("params_before", 0)), int(d.get("params_after", 0)),
                   changes, dict(d.get("extra", {})))

    def summary(self) -> str:
        drop = self.params_before - self.params_after
        pct = 100.0 * drop / self.params_before if self.params_before else 0.0
        return (f"{self.op}: {len(self.changes)} modules changed, params {self.params_before / 1e6:.2f} M -> "
                f"{self.params_after / 1e6:.2f} M (-{pct:.1f} %)")


def count_params(module: nn.Module | None) -> int:
    """Unique parameters (an aliased module is counted once)."""
    if module is None:
        return 0
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def describe(module: nn.Module | None) -> dict[str, Any]:
    """Type, direct parameter shapes and the width attributes that must stay in step with them."""
    if module is None:
        return {"type": None}
    out: dict[str, Any] = {"type": type(module).__name__}
    for name, p in module.named_parameters(recurse=False):
        out[name] = list(p.shape)
    if isinstance(module, nn.LayerNorm):
        out["normalized_shape"] = list(module.normalized_shape)
    if isinstance(module, nn.GroupNorm):
        out["num_channels"] = module.num_channels
    for attr in ("num_groups", "heads", "channels", "out_channels", "in_channels"):
        v = vars(module).get(attr)  # instance attributes only (diffusers configs warn)
        if isinstance(v, int) and not isinstance(v, bool):
            out[attr] = v
    if not any(True for _ in module.parameters(recurse=False)) and any(True for _ in module.parameters()):
        out["params"] = count_params(module)
    return out


# --------------------------------------------------------------------------------------------
# Name patterns: glob on dotted names, or a regular expression after "re:"
# --------------------------------------------------------------------------------------------
def pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def check_pattern(pattern: Any, where: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise AdcError(f"{where}: expected a non-empty name pattern, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise AdcError(f"{where}: {pattern!r} is not a valid regular expression ({exc})") from None
    return pattern


def match_names(model: nn.Module, pattern: str, where: str = "pattern") -> list[str]:
    """Names of the modules ``pattern`` selects; a pattern that selects nothing is an error."""
    check_pattern(pattern, where)
    names = [n for n, _ in model.named_modules() if n and pattern_matches(pattern, n)]
    if not names:
        sample = [n for n, _ in model.named_modules() if n][:3]
        raise AdcError(f"{where}: pattern {pattern!r} matches no module (names look like {', '.join(sample)}; "
                       "patterns are globs on dotted names, or 're:<regex>')")
    return names


def outermost(names: Iterable[str]) -> list[str]:
    """Drop names inside another selected name (replacing the parent replaces them too)."""
    chosen: list[str] = []
    for n in sorted(set(names)):
        if not any(n.startswith(c + ".") for c in chosen):
            chosen.append(n)
    return chosen


# --------------------------------------------------------------------------------------------
# Module surgery
# --------------------------------------------------------------------------------------------
def working_copy(model: nn.Module, inplace: bool) -> nn.Module:
    """The module a transformation edits: ``model`` itself when ``inplace``, else a deep copy.

    Why a copy by default: surgery reuses submodules, so an edited original is half-changed
    (a UNet whose resnets lost ``time_emb_proj`` still computes a time embedding and fails).
    ``inplace=True`` is for callers that own the model and need memory at full size (the runner).
    """
    return model if inplace else copy.deepcopy(model)


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def swap_modules(model: nn.Module, mapping: Mapping[nn.Module, nn.Module | None]) -> None:
    """Replace every reference to each old module, aliases included (diffusers' ``Downsample2D``
    may register its conv twice; AdcSR's official UNet registers its blocks twice)."""
    by_id = {id(old): new for old, new in mapping.items()}
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in by_id:
                new = by_id[id(child)]
                if new is None and isinstance(parent, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
                    raise AdcError(f"cannot set a member of {type(parent).__name__} to None "
                                   f"(attribute {attr!r}); replace it with 'identity' instead")
                setattr(parent, attr, new)


def new_param(t: torch.Tensor, like: nn.Parameter | None) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=True if like is None else like.requires_grad)


def rebuild_conv(m: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A conv of the same kind and hyper-parameters as ``m`` holding ``weight``/``bias``."""
    if not isinstance(m, nn.modules.conv._ConvNd) or m.transposed or m.groups != 1:
        raise AdcError(f"{type(m).__name__}: only ungrouped, non-transposed convolutions can be resized")
    with torch.device("meta"):
        new = type(m)(weight.shape[1], weight.shape[0], m.kernel_size, stride=m.stride, padding=m.padding,
                      dilation=m.dilation, groups=1, bias=bias is not None, padding_mode=m.padding_mode)
    new.weight = new_param(weight, m.weight)
    new.bias = None if bias is None else new_param(bias, m.bias if m.bias is not None else None)
    new.train(m.training)
    return new


def rebuild_linear(m: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight = new_param(weight, m.weight)
    new.bias = None if bias is None else new_param(bias, m.bias)
    new.train(m.training)
    return new


def rebuild_group_norm(m: nn.GroupNorm, num_groups: int, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, num_channels: int) -> nn.GroupNorm:
    if num_groups < 1 or num_channels % num_groups:
        raise AdcError(f"GroupNorm: {num_groups} groups do not divide {num_channels} channels")
    with torch.device("meta"):
        new = nn.GroupNorm(num_groups, num_channels, eps=m.eps, affine=m.affine)
    if m.affine:
        new.weight = new_param(weight, m.weight)
        new.bias = new_param(bias, m.bias)
    new.train(m.training)
    return new


def rebuild_layer_norm(m: nn.LayerNorm, width: int, weight: torch.Tensor | None,
                       bias: torch.Tensor | None) -> nn.LayerNorm:
    with torch.device("meta"):
        new = nn.LayerNorm(width, eps=m.eps, elementwise_affine=m.elementwise_affine, bias=m.bias is not None)
    if m.elementwise_affine:
        new.weight = new_param(weight, m.weight)
        if m.bias is not None:
            new.bias = new_param(bias, m.bias)
    new.train(m.training)
    return new


def refuse_wrappers(model: nn.Module, what: str) -> None:
    """LoRA-style wrappers (a ``base_layer`` beside adapters) must be merged before any resize."""
    for name, m in model.named_modules():
        if hasattr(m, "base_layer") and isinstance(getattr(m, "base_layer"), nn.Module):
            raise AdcError(f"{what}: {name!r} is a {type(m).__name__} adapter wrapper; merge the adapters "
                           "into the base weights first (e.g. peft merge_and_unload)")


# --------------------------------------------------------------------------------------------
# Constant modules and module specs (replacements that persist can rebuild)
# --------------------------------------------------------------------------------------------
class Constant(nn.Module):
    """Returns a stored tensor whatever it is called with: a branch folded to its value.

    ``expand_batch`` repeats the stored batch-1 value to the batch of the first tensor argument
    (needed where the caller reshapes by batch, e.g. attention keys).
    """

    def __init__(self, value: torch.Tensor, expand_batch: bool = False):
        super().__init__()
        self.register_buffer("value", value.detach().clone())
        self.expand_batch = expand_batch

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        v = self.value
        if self.expand_batch:
            first = next((a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)), None)
            if first is not None and v.shape[0] != first.shape[0]:
                v = v.expand(first.shape[0], *v.shape[1:])
        return v

    def extra_repr(self) -> str:
        return f"shape={tuple(self.value.shape)}, expand_batch={self.expand_batch}"


_ALLOWED_PREFIXES = ("torch.nn", "diffusers", "compress")


@dataclass(frozen=True)
class ModuleSpec:
    """A module named by import path (``"torch.nn:Identity"``) and keyword arguments.

    Why: a replacement given this way can be rebuilt from JSON by :func:`load_compressed`; only
    modules under ``torch.nn``, ``diffusers`` and ``compress`` are importable (no arbitrary code).
    """

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        obj = import_target(self.target)
        module = obj(**self.kwargs)
        if not isinstance(module, nn.Module):
            raise AdcError(f"{self.target}: built a {type(module).__name__}, expected an nn.Module")
        return module


def import_target(target: str) -> Any:
    """``"package.module:attr"`` -> the attribute, for allow-listed packages only."""
    if not isinstance(target, str) or ":" not in target:
        raise AdcError(f"{target!r}: expected 'package.module:name'")
    mod_name, _, attr = target.partition(":")
    if not any(mod_name == p or mod_name.startswith(p + ".") for p in _ALLOWED_PREFIXES):
        raise AdcError(f"{target!r}: only targets under {', '.join(_ALLOWED_PREFIXES)} may be built")
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise AdcError(f"{target!r}: cannot import ({exc})") from None
    return obj


def qualname(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def as_list(x: str | Sequence[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)
