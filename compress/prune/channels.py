"""Structured channel pruning of diffusers UNets and VAE decoders through torch-pruning.

torch-pruning's ``DependencyGraph`` finds which channels must go together (residual adds, skip
concatenations, GroupNorm, attention q/k/v/out, GEGLU halves) and removes them; the *choice* of
channels is made here, per dependency group, because BasePruner's own ranking gets three
things wrong on diffusers models (pruning-and-counting.md §1.6, §1.10):

- GEGLU: the group is rooted at the 2x-wide ``proj``, so a ratio r removes 2r of the inner
  width (and may pick both halves of one pair). Here a channel pair (hidden j, gate j) is one
  unit, so ``ff.net.0.proj`` loses exactly r of its inner width.
- ``round_to`` mixes per-GroupNorm-group and total channel counts (320 -> 64 at r=0.25). Here
  ``round_to`` applies only to groups with no GroupNorm and no heads; GroupNorm policies
  already give multiples of the group count.
- Attention: ``num_heads`` is known for every diffusers ``Attention`` (to_q/to_k/to_v); the same
  dims are removed from every head (``attention="head_dims"``) or whole heads
  (``"heads"``), then ``heads``/``inner_dim``/``scale`` are set (:mod:`.attention`).

GroupNorm policy (``gn_policy``), for a dependency group that feeds GroupNorms:

- ``keep_groups`` (default, torch-pruning's rule): the group's channels are cut into G equal
  chunks (G = lcm of the GroupNorms' group counts) and the same positions are removed from every
  chunk; every GroupNorm keeps its group count. Widths stay multiples of G.
- ``keep_group_size`` (ModelOpt's rule): whole GroupNorm groups are removed and ``num_groups``
  shrinks. Removing dead groups is then exact. A GroupNorm group that straddles two dependency
  groups (skip concatenation) cannot be removed by either and is kept.
- ``first_divisor`` (AdcSR's rule): channels are chosen freely, then ``num_groups`` becomes the
  first of ``divisors`` dividing the new width (channels are regrouped).

Importance: ``slice`` keeps the leading channels of each unit structure (the first k channels
of each dependency group, of each GroupNorm chunk, of each head, of each GEGLU half: the
structure-aware version of AdcSR's slice), ``magnitude`` (``GroupMagnitudeImportance``, L2 over
every layer of the group), ``taylor`` (``GroupTaylorImportance`` on gradients of a loss over a
few batches). Ties are broken towards removing later channels.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

from ..config import ranged, check_range, from_dict
from ..errors import AdcError
from ..zoo.adcsr import GN_DIVISORS, first_divisor
from ._common import (ModuleChange, TransformRecord, check_pattern, count_params, describe, match_names,
                      refuse_wrappers, working_copy)
from ._sync import sync_blocks, sync_samplers
from .attention import ScalePolicy, attention_modules, attention_state, sync_attention

Importance = Literal["slice", "magnitude", "taylor"]
GnPolicy = Literal["keep_groups", "keep_group_size", "first_divisor"]
Side = Literal["in", "out", "both"]


@dataclass
class ChannelPruneConfig:
    """How to prune. Ratios are fractions of channels *removed* per dependency group, in [0, 1)."""

    pruning_ratio: float = ranged(0.25, 0.0, 0.99)
    importance: Importance = "magnitude"
    # pattern -> ratio for the groups whose output channels include a matching module; the first
    # matching pattern (in order) wins. Example: {"*.ff.net.0.proj": 0.5, "up_blocks.3.*": 0.0}
    module_ratios: dict[str, float] = field(default_factory=dict)
    gn_policy: GnPolicy = "keep_groups"
    divisors: tuple[int, ...] = GN_DIVISORS  # for gn_policy="first_divisor"
    attention: Literal["head_dims", "heads", "off"] = "head_dims"
    # attention="heads": fraction of heads removed (default: the group ratio)
    head_ratio: float | None = ranged(None, 0.0, 0.99)
    attention_scale: ScalePolicy = "keep"
    # interface layers and which side of them is fixed: "in" (its input channels), "out", "both"
    interfaces: dict[str, Side] = field(default_factory=lambda: {"conv_in": "in", "conv_out": "out"})
    ignore: tuple[str, ...] = ()  # modules kept at their full shape (both sides)
    round_to: int | None = ranged(None, 1, 4096)  # only for groups with no GroupNorm and no attention heads
    taylor_multivariable: bool = False
    magnitude_p: int = ranged(2, 1, 8)

    def validate(self, path: str = "prune") -> None:
        check_range(self.pruning_ratio, 0.0, 1.0, f"{path}.pruning_ratio", hi_open=True)
        if self.head_ratio is not None:
            check_range(self.head_ratio, 0.0, 1.0, f"{path}.head_ratio", hi_open=True)
        for pat, r in self.module_ratios.items():
            check_pattern(pat, f"{path}.module_ratios")
            if isinstance(r, bool) or not isinstance(r, (int, float)):
                raise AdcError(f"{path}.module_ratios.{pat}: expected a number, got {r!r}")
            check_range(float(r), 0.0, 1.0, f"{path}.module_ratios.{pat}", hi_open=True)
        for pat, side in self.interfaces.items():
            check_pattern(pat, f"{path}.interfaces")
            if side not in ("in", "out", "both"):
                raise AdcError(f"{path}.interfaces.{pat}: {side!r} is not one of 'in', 'out', 'both'")
        for pat in self.ignore:
            check_pattern(pat, f"{path}.ignore")
        if self.round_to is not None and self.round_to < 1:
            raise AdcError(f"{path}.round_to: expected a positive integer, got {self.round_to}")
        if not self.divisors or any(d < 1 for d in self.divisors):
            raise AdcError(f"{path}.divisors: expected positive integers")
        for key, allowed in (("importance", ("slice", "magnitude", "taylor")),
                             ("gn_policy", ("keep_groups", "keep_group_size", "first_divisor")),
                             ("attention", ("head_dims", "heads", "off")), ("attention_scale", ("keep", "sdpa"))):
            if getattr(self, key) not in allowed:
                raise AdcError(f"{path}.{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")

    @classmethod
    def from_dict(cls, d: dict | None, path: str = "prune") -> "ChannelPruneConfig":
        return from_dict(cls, d, path)

    def to_dict(self) -> dict[str, Any]:
        from ..config import to_dict

        return to_dict(self)


# --------------------------------------------------------------------------------------------
# Calling the model
# --------------------------------------------------------------------------------------------
def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def main_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model output (tensor, tuple, dict or diffusers ``BaseOutput``)."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, dict):  # BaseOutput is an OrderedDict
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return main_tensor(out[0])
    raise AdcError(f"the model returned {type(out).__name__}; pass forward_fn returning a tensor")


def input_spec(inputs: Any) -> Any:
    """JSON description of example inputs (shapes and dtypes), so a graph can be traced again."""
    if torch.is_tensor(inputs):
        return {"__tensor__": list(inputs.shape), "dtype": str(inputs.dtype).removeprefix("torch.")}
    if isinstance(inputs, dict):
        return {"__dict__": {k: input_spec(v) for k, v in inputs.items()}}
    if isinstance(inputs, (tuple, list)):
        return {"__seq__": [input_spec(v) for v in inputs]}
    if inputs is None or isinstance(inputs, (bool, int, float, str)):
        return {"__value__": inputs}
    raise AdcError(f"example input of type {type(inputs).__name__} cannot be recorded")


def inputs_from_spec(spec: Any, device: torch.device | str = "cpu") -> Any:
    if "__tensor__" in spec:
        dtype = getattr(torch, spec["dtype"])
        return torch.zeros(spec["__tensor__"], dtype=dtype, device=device)
    if "__dict__" in spec:
        return {k: inputs_from_spec(v, device) for k, v in spec["__dict__"].items()}
    if "__seq__" in spec:
        return tuple(inputs_from_spec(v, device) for v in spec["__seq__"])
    return spec["__value__"]


@contextlib.contextmanager
def tracing_state(model: nn.Module):
    """Grad on, gradient checkpointing off, every parameter trainable, eval mode; restored after.

    Why: torch-pruning traces ``grad_fn`` edges, which need grad mode and parameters that require
    grad; a checkpoint wrapper hides the layers inside it (Diff-Pruning #8).
    """
    ckpt = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    req = {id(p): (p, p.requires_grad) for p in model.parameters()}
    training = model.training
    try:
        for m in ckpt:
            m.gradient_checkpointing = False
        for p, _ in req.values():
            p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for m in ckpt:
            m.gradient_checkpointing = True
        for p, r in req.values():
            p.requires_grad_(r)
        model.train(training)


def build_graph(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None):
    import torch_pruning as tp

    fwd = forward_fn or call_model
    return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                 forward_fn=lambda m, x: main_tensor(fwd(m, x)), verbose=False)


# --------------------------------------------------------------------------------------------
# Planning one dependency group
# --------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    root: nn.Module
    root_name: str
    handler: Any
    channels: int
    prune: list[int]
    kind: str
    ratio: float
    pattern: str | None
    units_before: int
    units_after: int
    note: str = ""
    gn_removed: dict[str, int] = field(default_factory=dict)  # GroupNorm name -> channels this plan removes


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _keep(n: int, ratio: float) -> int:
    return max(1, math.floor(n * (1.0 - ratio) + 1e-9))


def _root_map(item) -> dict[int, int]:
    idxs, roots = list(item.idxs), list(item.root_idxs)
    return {int(i): int(r) for i, r in zip(idxs, roots) if r is not None}


class _Planner:
    def __init__(self, model: nn.Module, cfg: ChannelPruneConfig, dg, scorer, names: dict[nn.Module, str],
                 frozen_in: dict[str, str], frozen_out: dict[str, str], ratio_names: list[tuple[str, float, set]]):
        from diffusers.models.activations import GEGLU, SwiGLU

        self.cfg, self.dg, self.scorer, self.names = cfg, dg, scorer, names
        self.frozen_in, self.frozen_out, self.ratio_names = frozen_in, frozen_out, ratio_names
        self.qkv: dict[nn.Module, tuple[str, nn.Module]] = {}
        for aname, attn in attention_modules(model).items():
            for role in ("to_q", "to_k", "to_v"):
                lin = getattr(attn, role, None)
                if isinstance(lin, nn.Linear):
                    self.qkv[lin] = (aname, attn)
        self.gated = {m.proj: n for n, m in model.named_modules() if isinstance(m, (GEGLU, SwiGLU))}

    def plan(self, group) -> _Plan:
        self._gn_items: list = []
        plan = self._plan(group)
        removed = set(plan.prune)
        for gn, name, item in self._gn_items:
            k = sum(1 for r in _root_map(item).values() if r in removed)
            if k:
                plan.gn_removed[name] = plan.gn_removed.get(name, 0) + k
        return plan

    def _plan(self, group) -> _Plan:
        dg, cfg = self.dg, self.cfg
        root_item = group[0]
        root, handler = root_item.dep.target.module, root_item.dep.handler
        n = len(root_item.idxs)
        root_name = self.names.get(root, "?")
        outs, ins, gn_items, qkv_items, gated_items = [], [], [], [], []
        for item in group:
            mod = item.dep.target.module
            if not isinstance(mod, nn.Module):
                continue
            is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
            name = self.names.get(mod, "?")
            (outs if is_out else ins).append(name)
            if is_out and isinstance(mod, nn.GroupNorm):
                gn_items.append((mod, name, item))
                self._gn_items.append((mod, name, item))
            if is_out and mod in self.qkv:
                qkv_items.append((mod, item))
            if is_out and mod in self.gated:
                gated_items.append((mod, item))
        for name in outs:
            if name in self.frozen_out:
                return self._skip(root, root_name, handler, n, f"kept: output of {self.frozen_out[name]}")
        for name in ins:
            if name in self.frozen_in:
                return self._skip(root, root_name, handler, n, f"kept: input of {self.frozen_in[name]}")

        ratio, pattern = cfg.pruning_ratio, None
        for pat, r, matched in self.ratio_names:
            if matched.intersection(outs):
                ratio, pattern = r, pat
                break
        if qkv_items and cfg.attention == "off":
            return self._skip(root, root_name, handler, n, "kept: attention='off'")
        if qkv_items and cfg.attention == "heads" and cfg.head_ratio is not None and pattern is None:
            ratio = cfg.head_ratio
        if ratio == 0:
            return self._skip(root, root_name, handler, n, "ratio 0")

        imp = self._importance(group, n)
        if qkv_items:
            if gn_items or gated_items:
                raise AdcError(f"group rooted at {root_name!r}: attention heads coupled with GroupNorm/GEGLU "
                               "channels is not supported")
            return self._plan_attention(root, root_name, handler, n, qkv_items, imp, ratio, pattern)
        ties, pinned, chunks, kind = _UnionFind(n), set(), None, "channels"
        for mod, item in gated_items:
            half = mod.out_features // 2
            m = _root_map(item)
            for j in range(half):
                if j in m and j + half in m:
                    ties.union(m[j], m[j + half])
            kind = "gated-ffn"
        if gn_items:
            if gated_items:
                raise AdcError(f"group rooted at {root_name!r}: GroupNorm coupled with a gated FFN is not supported")
            kind = "groupnorm"
            if cfg.gn_policy == "keep_groups":
                # chunk by every GroupNorm's group count if possible, else by those this group fully feeds
                full = [gn.num_groups for gn, _, item in gn_items if len(item.idxs) == gn.num_channels]
                g_all, g_full = math.lcm(*[gn.num_groups for gn, _, _ in gn_items]), math.lcm(*full) if full else 1
                chunks = g_all if n % g_all == 0 else g_full
                if n % chunks:
                    raise AdcError(f"group rooted at {root_name!r}: {n} channels do not split into {chunks} GroupNorm "
                                   "chunks (gn_policy='keep_groups'); use 'first_divisor'")
            elif cfg.gn_policy == "keep_group_size":
                for gn, _, item in gn_items:
                    size = gn.num_channels // gn.num_groups
                    m = _root_map(item)
                    for k in range(gn.num_groups):
                        members = [m.get(l) for l in range(k * size, (k + 1) * size)]
                        present = [r for r in members if r is not None]
                        for r in present[1:]:
                            ties.union(present[0], r)
                        if len(present) != size:
                            pinned.update(present)
        if chunks:
            return self._plan_uniform(root, root_name, handler, n, n // chunks, chunks, list(range(n)), imp, ratio,
                                      pattern, kind)
        units: dict[int, list[int]] = {}
        for r in range(n):
            units.setdefault(ties.find(r), []).append(r)
        unit_list = list(units.values())
        keep = _keep(len(unit_list), ratio)
        if cfg.round_to and not gn_items:  # never on GroupNorm-coupled groups (see module docstring)
            keep = max(min(cfg.round_to, len(unit_list)), keep - keep % cfg.round_to)
        locked = [u for u in unit_list if pinned.intersection(u)]
        free = [u for u in unit_list if not pinned.intersection(u)]
        free.sort(key=lambda u: (float(imp[u].mean()), -u[0]))
        n_remove = min(len(unit_list) - keep, len(free))
        note = f"{len(locked)} GroupNorm groups straddle another dependency group and are kept" if locked else ""
        removed = [r for u in free[:n_remove] for r in u]
        return _Plan(root, root_name, handler, n, sorted(removed), kind, ratio, pattern, len(unit_list),
                     len(unit_list) - n_remove, note)

    def _plan_attention(self, root, root_name, handler, n, qkv_items, imp, ratio, pattern) -> _Plan:
        lin, item = qkv_items[0]
        aname, attn = self.qkv[lin]
        for other, _ in qkv_items[1:]:
            if self.qkv[other][1] is not attn:
                raise AdcError(f"group rooted at {root_name!r} couples two attentions ({aname!r}, "
                               f"{self.qkv[other][0]!r}); not supported")
        heads = attn.heads
        inner = lin.out_features
        if inner % heads or len(item.idxs) != inner or n != inner:
            raise AdcError(f"{aname}: cannot map {n} channels onto {heads} heads of {inner // heads}")
        head_dim = inner // heads
        m = _root_map(item)
        order = [m[l] for l in range(inner)]  # root index of (head h, dim d) at h * head_dim + d
        if self.cfg.attention == "heads":
            units = [order[h * head_dim:(h + 1) * head_dim] for h in range(heads)]
            keep = _keep(heads, ratio)
            units.sort(key=lambda u: (float(imp[u].mean()), -u[0]))
            removed = [r for u in units[:heads - keep] for r in u]
            return _Plan(root, root_name, handler, n, sorted(removed), "attention-heads", ratio, pattern, heads, keep)
        return self._plan_uniform(root, root_name, handler, n, head_dim, heads, order, imp, ratio, pattern,
                                  "attention-head-dims")

    def _plan_uniform(self, root, root_name, handler, n, size, chunks, order, imp, ratio, pattern, kind) -> _Plan:
        """Remove the same positions from each of ``chunks`` equal chunks (``order`` lists root indices)."""
        pos_score = imp[torch.tensor(order)].view(chunks, size).mean(0)
        keep = _keep(size, ratio)
        ranked = sorted(range(size), key=lambda p: (float(pos_score[p]), -p))
        drop = ranked[:size - keep]
        removed = [order[c * size + p] for c in range(chunks) for p in drop]
        return _Plan(root, root_name, handler, n, sorted(removed), kind, ratio, pattern, size, keep,
                     f"{chunks} chunks of {size}")

    def _importance(self, group, n: int) -> torch.Tensor:
        position = -torch.arange(n, dtype=torch.float64)
        if self.scorer is None:
            return position
        imp = self.scorer(group)
        if imp is None:
            return torch.zeros(n, dtype=torch.float64)
        return imp.detach().to("cpu", torch.float64)

    def _skip(self, root, root_name, handler, n, why) -> _Plan:
        return _Plan(root, root_name, handler, n, [], "kept", 0.0, None, n, n, why)


# --------------------------------------------------------------------------------------------
# The transformation
# --------------------------------------------------------------------------------------------
def _resolve(model: nn.Module, cfg: ChannelPruneConfig):
    frozen_in: dict[str, str] = {}
    frozen_out: dict[str, str] = {}
    for pat, side in cfg.interfaces.items():
        for name in match_names(model, pat, where=f"prune.interfaces {pat!r}"):
            for sub, _ in model.get_submodule(name).named_modules(prefix=name):
                if side in ("in", "both"):
                    frozen_in[sub] = name
                if side in ("out", "both"):
                    frozen_out[sub] = name
    for pat in cfg.ignore:
        for name in match_names(model, pat, where=f"prune.ignore {pat!r}"):
            for sub, _ in model.get_submodule(name).named_modules(prefix=name):
                frozen_in[sub] = frozen_out[sub] = name
    ratio_names = []
    for pat, r in cfg.module_ratios.items():
        matched = set(match_names(model, pat, where=f"prune.module_ratios {pat!r}"))
        hit = sorted(matched & (set(frozen_in) | set(frozen_out)))
        if hit and r > 0:
            owner = frozen_out.get(hit[0]) or frozen_in.get(hit[0])
            raise AdcError(f"prune.module_ratios {pat!r} asks to prune {hit[0]!r}, which is kept as interface/ignored "
                           f"layer {owner!r}; remove it from prune.interfaces/ignore to prune it")
        # a pattern naming a container applies to the layers inside it
        expanded = set()
        for name in matched:
            expanded.update(sub for sub, _ in model.get_submodule(name).named_modules(prefix=name))
        ratio_names.append((pat, float(r), expanded))
    return frozen_in, frozen_out, ratio_names


def _scorer(cfg: ChannelPruneConfig):
    import torch_pruning as tp

    if cfg.importance == "slice":
        return None
    if cfg.importance == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=cfg.magnitude_p, group_reduction="mean", normalizer=None)
    return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None,
                                               multivariable=cfg.taylor_multivariable)


def _accumulate_gradients(model, batches: Iterable, forward_fn, loss_fn) -> int:
    model.zero_grad(set_to_none=True)
    count = 0
    for batch in batches:
        out = main_tensor((forward_fn or call_model)(model, batch))
        loss = loss_fn(out, batch) if loss_fn is not None else out.float().pow(2).mean()
        if not torch.is_tensor(loss) or loss.ndim != 0:
            raise AdcError("prune taylor: loss_fn must return a scalar tensor")
        loss.backward()
        count += 1
    if count == 0:
        raise AdcError("prune taylor: importance_batches() yielded no batch")
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return count


def _gn_state(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.num_channels, m.num_groups) for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}


def gn_groups(name: str, c0: int, g0: int, c: int, policy: str, divisors: tuple[int, ...]) -> int:
    """The group count a GroupNorm of ``c0`` channels in ``g0`` groups gets at ``c`` channels."""
    if policy == "keep_groups":
        g = g0
    elif policy == "keep_group_size":
        g = c // (c0 // g0) if c % (c0 // g0) == 0 else -1
    else:
        g = first_divisor(c, tuple(divisors))
    if c < 1 or g < 1 or c % g:
        raise AdcError(f"{name}: {c} channels left cannot follow GroupNorm policy {policy!r} "
                       f"(was {c0} channels in {g0} groups); use gn_policy='first_divisor'")
    return g


def finish(model: nn.Module, gn_before: dict[str, tuple[int, int]], attn_before: dict[str, dict],
           gn_policy: str, divisors: tuple[int, ...], attention: str, attention_scale: str) -> list[ModuleChange]:
    """After torch-pruning removed channels: GroupNorm groups, sampler/block widths, attention."""
    changes = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.GroupNorm) or name not in gn_before:
            continue
        c0, g0 = gn_before[name]
        c = m.weight.shape[0] if m.affine else m.num_channels
        m.num_channels = c
        if c == c0:
            continue
        m.num_groups = gn_groups(name, c0, g0, c, gn_policy, divisors)
        g = m.num_groups
        changes.append(ModuleChange(name, "regrouped", {"num_channels": c0, "num_groups": g0},
                                    {"num_channels": c, "num_groups": g}))
    changes += sync_samplers(model)
    changes += sync_blocks(model)
    changes += sync_attention(model, attn_before, keep_heads=(attention != "heads"), scale=attention_scale)
    return changes


def prune_channels(model: nn.Module, config: ChannelPruneConfig | dict, example_inputs: Any,
                   forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                   importance_batches: Callable[[], Iterable[Any]] | None = None,
                   loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
                   graph: Any = None, *, inplace: bool = False) -> tuple[nn.Module, TransformRecord]:
    """Prune channels of ``model`` with torch-pruning's dependency graph.

    ``example_inputs``: what the model is called with for tracing (dict -> kwargs, tuple -> args,
    tensor). ``forward_fn(model, inputs)``: how to call it instead (its first tensor output is used).
    ``importance_batches()``: for ``importance="taylor"``, an iterable of batches (each in the
    ``example_inputs`` format); gradients of ``loss_fn(output, batch)`` (default: mean squared
    output) are accumulated over them. ``graph``: a torch-pruning ``DependencyGraph`` of
    ``model`` to use instead of tracing one (the analysis plan's, see
    :meth:`compress.analysis.Plan.take_graph`). On ``meta`` (a structure-only model) every
    importance is replaced by the leading-channel order: the architecture only depends on how
    many channels go. Returns ``(model, record)``; the record's ``extra`` holds torch-pruning's
    ``pruning_history()`` and the per-group decisions. ``model`` is left unchanged (a copy is
    pruned, ``graph`` rebound to it) unless ``inplace``.
    """
    cfg = config if isinstance(config, ChannelPruneConfig) else ChannelPruneConfig.from_dict(config)
    cfg.validate("prune")
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and cfg.importance != "slice":
        from dataclasses import replace

        cfg = replace(cfg, importance="slice")  # no values to rank: the shapes are the same for any choice
    if cfg.importance == "taylor" and importance_batches is None:
        raise AdcError("prune.importance='taylor' needs importance_batches (a callable returning batches)")
    refuse_wrappers(model, "prune_channels")
    frozen_in, frozen_out, ratio_names = _resolve(model, cfg)
    if not inplace:
        model = working_copy(model, False)
        if graph is not None:
            from .graph import rebind_graph

            graph = rebind_graph(graph, model)
    names = {}
    for n, m in model.named_modules():
        names.setdefault(m, n)
    before = count_params(model)
    shapes_before = {n: describe(m) for n, m in model.named_modules()}
    gn_before, attn_before = _gn_state(model), attention_state(model)
    try:  # zeros of these shapes let the record be replayed through the graph (else: by shapes)
        trace = input_spec(example_inputs) if forward_fn is None else None
    except AdcError:
        trace = None
    with torch.no_grad():
        ref_shape = tuple(main_tensor((forward_fn or call_model)(model, example_inputs)).shape)

    with tracing_state(model):
        dg = graph if graph is not None else build_graph(model, example_inputs, forward_fn)
        n_batches = 0
        if cfg.importance == "taylor":
            n_batches = _accumulate_gradients(model, importance_batches(), forward_fn, loss_fn)
        planner = _Planner(model, cfg, dg, _scorer(cfg), names, frozen_in, frozen_out, ratio_names)
        plans = [planner.plan(g) for g in dg.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear))]
        if cfg.importance == "taylor":
            model.zero_grad(set_to_none=True)
    removed: dict[str, int] = {}
    for plan in plans:
        for name, k in plan.gn_removed.items():
            removed[name] = removed.get(name, 0) + k
    for name, k in removed.items():  # refuse before anything is cut
        c0, g0 = gn_before[name]
        gn_groups(name, c0, g0, c0 - k, cfg.gn_policy, cfg.divisors)
    for plan in plans:
        if not plan.prune:
            continue
        group = dg.get_pruning_group(plan.root, plan.handler, plan.prune)
        if not dg.check_pruning_group(group):
            raise AdcError(f"group rooted at {plan.root_name!r}: pruning {len(plan.prune)} of {plan.channels} "
                           "channels would empty a layer")
        group.prune()
    changes = [ModuleChange(n, "resized", shapes_before[n], describe(m)) for n, m in model.named_modules()
               if n in shapes_before and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.GroupNorm, nn.LayerNorm))
               and describe(m) != shapes_before[n]]
    changes += finish(model, gn_before, attn_before, cfg.gn_policy, cfg.divisors, cfg.attention, cfg.attention_scale)
    changes += _check_runs(model, example_inputs, forward_fn, ref_shape)
    history = [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in dg.pruning_history()]
    groups = [{"root": p.root_name, "kind": p.kind, "ratio": p.ratio, "pattern": p.pattern, "channels": p.channels,
               "pruned": len(p.prune), "units_before": p.units_before, "units_after": p.units_after,
               **({"note": p.note} if p.note else {})} for p in plans]
    extra = {"pruning_history": history, "groups": groups, "importance_batches": n_batches,
             "trace": trace, "graph": "the analysis plan's" if graph is not None else "traced here",
             **({"structure_only": "built on meta: leading channels kept"} if on_meta else {}),
             "policies": {"gn_policy": cfg.gn_policy, "attention": cfg.attention,
                          "attention_scale": cfg.attention_scale,
                          "temperature": ("1/sqrt(original head size) kept" if cfg.attention_scale == "keep"
                                          else "1/sqrt(new head size), SDPA's default")}}
    return model, TransformRecord("prune_channels", {"config": cfg.to_dict()}, before, count_params(model),
                                  changes, extra)


def _check_runs(model, example_inputs, forward_fn, ref_shape) -> list[ModuleChange]:
    """Run the pruned model once: a broken dependency must fail here, naming the cause.

    Up/Downsample blocks without a conv (pooling, interpolation) have no weight to read their
    width from; it is taken from their input during this run.
    """
    from ._sync import _conv_of
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    changes, hooks = [], []
    for name, m in model.named_modules():
        if isinstance(m, (Downsample2D, Upsample2D)) and _conv_of(m) is None:
            def fix(mod, args, kwargs, name=name):
                x = args[0] if args else kwargs.get("hidden_states")
                if torch.is_tensor(x) and x.shape[1] != mod.channels:
                    changes.append(ModuleChange(name, "attribute", {"channels": mod.channels,
                                                                    "out_channels": mod.out_channels},
                                                {"channels": x.shape[1], "out_channels": x.shape[1]}))
                    mod.channels = mod.out_channels = x.shape[1]
            hooks.append(m.register_forward_pre_hook(fix, with_kwargs=True))
    try:
        with torch.no_grad():
            shape = tuple(main_tensor((forward_fn or call_model)(model, example_inputs)).shape)
    except Exception as exc:  # noqa: BLE001 - reported as a one-line error
        raise AdcError(f"the pruned model no longer runs ({type(exc).__name__}: {str(exc)[:200]})") from exc
    finally:
        for h in hooks:
            h.remove()
    if shape != ref_shape:
        raise AdcError(f"the pruned model's output shape {shape} differs from {ref_shape} (an interface was pruned)")
    return changes


def apply_history(model: nn.Module, record: TransformRecord, example_inputs: Any = None,
                  forward_fn: Callable | None = None, *, inplace: bool = False) -> nn.Module:
    """Replay a ``prune_channels`` record on a dense model of the same architecture (a copy unless ``inplace``).

    The graph is traced again (on ``example_inputs``, or zeros shaped like the recorded ones)
    and torch-pruning's history re-applied: with the dense weights this reproduces the pruned
    weights; on ``meta`` or random weights it reproduces the architecture.
    """
    if record.op != "prune_channels":
        raise AdcError(f"apply_history: record op is {record.op!r}, expected 'prune_channels'")
    cfg = ChannelPruneConfig.from_dict(record.args.get("config", {}), "record.args.config")
    if example_inputs is None:
        spec = record.extra.get("trace")
        if spec is None:
            raise AdcError("apply_history: the record was made with a custom forward_fn; pass example_inputs "
                           "and forward_fn")
        device = next(model.parameters()).device
        example_inputs = inputs_from_spec(spec, device)
    model = working_copy(model, inplace)
    gn_before, attn_before = _gn_state(model), attention_state(model)
    with tracing_state(model):
        dg = build_graph(model, example_inputs, forward_fn)
    history = [(n, bool(o), list(i)) for n, o, i in record.extra.get("pruning_history", [])]
    try:
        dg.load_pruning_history(history)
    except (AttributeError, IndexError, ValueError) as exc:
        raise AdcError(f"apply_history: the pruning history does not fit this model ({str(exc)[:160]})") from None
    finish(model, gn_before, attn_before, cfg.gn_policy, cfg.divisors, cfg.attention, cfg.attention_scale)
    for c in record.changes:  # widths of conv-less samplers, measured when the record was made
        if c.action == "attribute" and set(c.after) == {"channels", "out_channels"}:
            m = model.get_submodule(c.name)
            m.channels, m.out_channels = c.after["channels"], c.after["out_channels"]
    return model


__all__ = ["ChannelPruneConfig", "prune_channels", "apply_history", "call_model", "main_tensor"]
