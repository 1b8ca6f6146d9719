"""AdcSR's layer-wise leading slice: every layer keeps its first ``int(ratio_keep * C)`` channels.

Each ``Conv``/``Linear`` becomes ``W[:int(k*out), :int(k*in)]`` (bias ``b[:int(k*out)]``), each
``GroupNorm``/``LayerNorm`` keeps its first ``int(k*C)`` affine entries, the Up/Downsample
``channels`` follow, and attention keeps its head count (the head size shrinks). Nothing looks
at importance or at dependencies: this is the official initialisation, reproduced bit for bit.
It is *not* a sub-network of the dense model (GEGLU halves, heads and skip-concat segments get
re-mixed); :func:`compress.prune.channels.prune_channels` with ``importance="slice"`` is the
structure-aware variant.

``int(k * C)`` is computed exactly as the official code does (``int(C * 0.75)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..config import ranged, check_range
from ..errors import AdcError
from ..zoo.adcsr import GN_DIVISORS, first_divisor
from ._common import (ModuleChange, TransformRecord, count_params, describe, rebuild_conv, rebuild_group_norm,
                      rebuild_layer_norm, rebuild_linear, refuse_wrappers, swap_modules, working_copy)
from ._sync import sync_blocks, sync_samplers
from .attention import ScalePolicy, attention_state, sync_attention

GnPolicy = Literal["first_divisor", "keep_groups", "keep_group_size"]


@dataclass
class SliceConfig:
    """Recipe form of :func:`slice_width`'s arguments (``ratio_keep`` = fraction of channels kept)."""

    ratio_keep: float = ranged(0.75, 0.01, 1.0)
    gn_policy: GnPolicy = "first_divisor"
    divisors: tuple[int, ...] = GN_DIVISORS
    attention_scale: ScalePolicy = "sdpa"

    def validate(self, path: str = "slice") -> None:
        check_range(self.ratio_keep, 0.0, 1.0, f"{path}.ratio_keep")
        if self.ratio_keep == 0:
            raise AdcError(f"{path}.ratio_keep: 0 keeps nothing; expected a number in (0, 1]")
        if not self.divisors or any(d < 1 for d in self.divisors):
            raise AdcError(f"{path}.divisors: expected positive integers, got {list(self.divisors)}")

    @classmethod
    def from_dict(cls, d: dict | None, path: str = "slice") -> "SliceConfig":
        from ..config import from_dict

        return from_dict(cls, d, path)


def _groups(m: nn.GroupNorm, new_c: int, policy: str, divisors: tuple[int, ...], name: str) -> int:
    if policy == "first_divisor":
        return first_divisor(new_c, divisors)
    if policy == "keep_groups":
        if new_c % m.num_groups:
            raise AdcError(f"{name}: {new_c} channels cannot keep {m.num_groups} groups (gn_policy='keep_groups'); "
                           "use 'first_divisor'")
        return m.num_groups
    if policy == "keep_group_size":
        size = m.num_channels // m.num_groups
        if new_c % size:
            raise AdcError(f"{name}: {new_c} channels are not whole groups of {size} (gn_policy='keep_group_size'); "
                           "use 'first_divisor'")
        return new_c // size
    raise AdcError(f"gn_policy {policy!r}: expected one of first_divisor, keep_groups, keep_group_size")


def slice_width(module: nn.Module, ratio_keep: float = 0.75, gn_policy: GnPolicy = "first_divisor",
                divisors: tuple[int, ...] = GN_DIVISORS, attention_scale: ScalePolicy = "sdpa", *,
                inplace: bool = False) -> tuple[nn.Module, TransformRecord]:
    """Leading-slice every Conv/Linear/GroupNorm/LayerNorm of ``module`` to ``int(ratio_keep*C)``.

    ``gn_policy``: ``first_divisor`` (AdcSR: first of ``divisors`` dividing the new width),
    ``keep_groups`` or ``keep_group_size`` (error where the new width does not allow it).
    ``attention_scale``: ``sdpa`` (AdcSR; ``attn.scale`` set to 1/sqrt(new head size)) or
    ``keep`` (see :mod:`compress.prune.attention`). Interfaces are sliced too: widen them first
    with :func:`compress.prune.interface.widen_module` and :func:`presliced_width`. ``module`` is
    left unchanged (a copy is edited) unless ``inplace``.
    """
    cfg = SliceConfig(float(ratio_keep), gn_policy, tuple(divisors), attention_scale)
    cfg.validate("slice_width")
    if gn_policy not in ("first_divisor", "keep_groups", "keep_group_size"):
        raise AdcError(f"slice_width gn_policy {gn_policy!r}: expected first_divisor, keep_groups or keep_group_size")
    refuse_wrappers(module, "slice_width")
    k = cfg.ratio_keep
    keep = lambda c: int(c * k)  # noqa: E731  (the official rounding: int(C * 0.75))
    before_params = count_params(module)
    attn_before = attention_state(module)
    _check_geglu(module, keep)
    module = working_copy(module, inplace)

    mapping: dict[nn.Module, nn.Module] = {}
    changes: list[ModuleChange] = []
    for name, m in list(module.named_modules()):
        if isinstance(m, nn.modules.conv._ConvNd) or isinstance(m, nn.Linear):
            w = m.weight
            out_c, in_c = keep(w.shape[0]), keep(w.shape[1])
            if out_c < 1 or in_c < 1:
                raise AdcError(f"{name}: slicing {tuple(w.shape[:2])} by {k} leaves no channels")
            nw = w.detach()[:out_c, :in_c]
            nb = None if m.bias is None else m.bias.detach()[:out_c]
            new = rebuild_linear(m, nw, nb) if isinstance(m, nn.Linear) else rebuild_conv(m, nw, nb)
        elif isinstance(m, nn.GroupNorm):
            c = keep(m.num_channels)
            if c < 1:
                raise AdcError(f"{name}: slicing {m.num_channels} channels by {k} leaves none")
            g = _groups(m, c, gn_policy, cfg.divisors, name)
            new = rebuild_group_norm(m, g, None if m.weight is None else m.weight.detach()[:c],
                                     None if m.bias is None else m.bias.detach()[:c], c)
        elif isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                raise AdcError(f"{name}: LayerNorm over {tuple(m.normalized_shape)} (more than one dim) is not sliced")
            c = keep(m.normalized_shape[0])
            new = rebuild_layer_norm(m, c, None if m.weight is None else m.weight.detach()[:c],
                                     None if m.bias is None else m.bias.detach()[:c])
        else:
            continue
        mapping[m] = new
        changes.append(ModuleChange(name, "resized", describe(m), describe(new)))
    if not mapping:
        raise AdcError("slice_width: the module has no Conv/Linear/GroupNorm/LayerNorm to slice")
    swap_modules(module, mapping)
    changes += sync_samplers(module, ratio=k)
    changes += sync_blocks(module)
    changes += sync_attention(module, attn_before, keep_heads=True, scale=attention_scale)
    return module, TransformRecord("slice_width", {"ratio_keep": k, "gn_policy": gn_policy,
                                                   "divisors": list(cfg.divisors), "attention_scale": attention_scale},
                                   before_params, count_params(module), changes)


def _check_geglu(module: nn.Module, keep) -> None:
    """A gated FFN's ``proj`` must slice to an even width that its ``net.2`` input matches."""
    from diffusers.models.activations import GEGLU, SwiGLU

    for name, m in module.named_modules():
        if isinstance(m, (GEGLU, SwiGLU)):
            out = m.proj.out_features
            if keep(out) % 2 or keep(out) // 2 != keep(out // 2):
                raise AdcError(f"{name}.proj: slicing {out} outputs gives {keep(out)}, which does not split into two "
                               f"halves of {keep(out // 2)}; choose another ratio_keep")


__all__ = ["slice_width", "SliceConfig", "GnPolicy"]
