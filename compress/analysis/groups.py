"""torch-pruning dependency groups of one component, reported by coupled layer and channel range.

Why torch-pruning: its ``DependencyGraph`` follows the autograd graph through skip concats,
GroupNorm, attention reshapes and GEGLU chunks, which is exactly the channel coupling a
structured pruner must respect. The graph is built per component (UNet, VAE decoder) on a
reduced-resolution copy of the inputs it received in the traced pipeline call: the coupling
depends on the wiring, not on the resolution, and on ``meta`` tensors the full-width SD UNet
builds in seconds without memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import AdcError

# Channel-carrying layers that can root a group (the pruner's own choice for CNNs/transformers).
ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class CoupledLayer:
    """One layer's share of a group: which dimension and which indices move together."""

    name: str
    cls: str
    dim: str  # "out" or "in"
    count: int  # coupled indices in this layer
    size: int  # the layer's full size along ``dim``
    ranges: str  # index runs, e.g. "0:320" or "640:960" (a slice of a concatenated input)
    chunks: int = 1  # count / group channels: 2 for GEGLU's value and gate halves
    role: str = ""  # the layer's classification (filled in by the analyser)


@dataclass
class PrunableGroup:
    """Channels that must be pruned together, with the layers they couple."""

    id: int
    scope: str
    root: str
    channels: int  # independent channels in the group
    layers: list[CoupledLayer]
    tags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def blocks(self) -> list[str]:
        """Top-level blocks the group spans (``unet.down_blocks.0``, ``unet.up_blocks.3``, ...)."""
        out = []
        depth = self.scope.count(".") + 1 if self.scope else 0
        for layer in self.layers:
            parts = layer.name.split(".")
            rest = parts[depth:]
            key = ".".join(parts[: depth + (2 if len(rest) > 1 and rest[1].isdigit() else 1)])
            if key not in out:
                out.append(key)
        return out

    def layer_names(self) -> list[str]:
        return list(dict.fromkeys(layer.name for layer in self.layers))


def _runs(idxs: list[int], chunk: int = 0) -> str:
    """Index runs ``a:b``; with ``chunk``, runs are also cut every ``chunk`` indices from their start
    (so GEGLU's proj shows its value and gate halves, ``0:1280,1280:2560``)."""
    s = sorted(set(idxs))
    if not s:
        return ""
    runs, start, prev = [], s[0], s[0]
    for i in s[1:]:
        if i != prev + 1 or (chunk and i - start >= chunk):
            runs.append((start, prev + 1))
            start = i
        prev = i
    runs.append((start, prev + 1))
    return ",".join(f"{a}:{b}" for a, b in runs)


def _plain(idxs) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


def _tensors(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple") and not isinstance(out, torch.Tensor):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def reduce_spatial(h: int, w: int, min_side: int) -> tuple[int, int]:
    """The smallest power-of-two reduction of (h, w) that keeps both sides >= ``min_side``."""
    f = 1
    while min(h, w) // (2 * f) >= min_side and h % (2 * f) == 0 and w % (2 * f) == 0:
        f *= 2
    return h // f, w // f


def reduced_inputs(inputs: dict[str, Any], factor: int) -> dict[str, Any]:
    """Pipeline inputs with every 4-D float tensor ``factor`` times smaller (random values)."""

    def make(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = list(t.shape)
        if t.is_floating_point() and t.dim() == 4 and factor > 1 and shape[2] % factor == 0 and shape[3] % factor == 0:
            shape[2], shape[3] = shape[2] // factor, shape[3] // factor
        if not t.is_floating_point():
            return t.clone()
        if t.device.type == "meta":
            return torch.empty(shape, dtype=t.dtype, device=t.device)
        return torch.rand(shape, dtype=t.dtype, device=t.device) * 2 - 1

    return {k: make(v) for k, v in inputs.items()}


class _Stop(BaseException):
    """Ends the pipeline run once the scope has produced its output (BaseException: never swallowed)."""


def _peft_base() -> type | None:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # peft missing or broken: no LoRA wrappers to fold
        return None
    return BaseTunerLayer


def reduced_example(example: tuple[tuple, dict], min_side: int,
                    device: torch.device | None = None) -> tuple[tuple, dict]:
    """Fresh tensors shaped like a recorded call's arguments, 4-D float ones at reduced resolution."""

    def make(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = list(t.shape)
        if t.is_floating_point() and t.dim() == 4:
            shape[2], shape[3] = reduce_spatial(shape[2], shape[3], min_side)
        dev = device or t.device
        if not t.is_floating_point():
            return torch.zeros(shape, dtype=t.dtype, device=dev) if t.device.type == "meta" else t.clone().to(dev)
        if dev.type == "meta":
            return torch.empty(shape, dtype=t.dtype, device=dev)
        return torch.randn(shape, dtype=t.dtype, device=dev)

    args, kwargs = example
    return pytree.tree_map(make, tuple(args)), pytree.tree_map(make, dict(kwargs))


class _StaticIndexMapping:
    """Compute torch-pruning's index mappings once for a whole enumeration of groups.

    ``DependencyGraph.get_pruning_group`` recomputes every concat/split/reshape index mapping of
    the whole graph on each call (``index_mapping.update_index_mapping``), although they depend
    only on the graph, which does not change while we only list groups. On the full SD UNet that
    is ~45 ms x 130 groups; computing them once and skipping the recomputation inside this
    context gives identical groups (checked against the stock path in the tests).
    """

    def __init__(self, dg: Any):
        from torch_pruning.dependency import index_mapping

        self.mod, self.dg = index_mapping, dg
        self.orig = index_mapping.update_index_mapping

    def __enter__(self) -> None:
        self.orig(self.dg)
        self.mod.update_index_mapping = lambda graph: None if graph is self.dg else self.orig(graph)

    def __exit__(self, *exc: Any) -> None:
        self.mod.update_index_mapping = self.orig


def iter_groups(dg: Any, ignored: list[nn.Module], probe: str = "single", skip_roots: set[int] = frozenset()):
    """Yield ``(items, unit)`` per group: items = [(module, handler name, plain indices)].

    Same roots and visiting order as ``DependencyGraph.get_all_groups``. ``probe="single"``
    roots each group at output channel 0 only: every coupled layer then lists where that one
    channel lands (one offset per chunk: two for GEGLU, the skip offset in a concat) and the
    group's channels are the root's width / its own chunk count, so ``unit`` = channels per
    chunk; milliseconds instead of seconds per group at full SD width. ``probe="full"`` uses
    every root channel (torch-pruning's own way; ``unit`` = 0, indices are explicit).
    """
    if probe not in ("single", "full"):
        raise AdcError(f"probe={probe!r}, expected 'single' or 'full'")
    ignored_ids = {id(m) for m in ignored}
    visited: set[int] = set()
    with _StaticIndexMapping(dg):
        for m in list(dg.module2node.keys()):
            if id(m) in ignored_ids or id(m) in skip_roots or not isinstance(m, ROOT_TYPES) or id(m) in visited:
                continue
            pruner = dg.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            width = pruner.get_out_channels(m)
            group = dg.get_pruning_group(m, pruner.prune_out_channels, [0] if probe == "single" else list(range(width)))
            ok = True
            items = []
            for dep, idxs in group.items:
                handler = getattr(dep.handler, "__name__", str(dep.handler))
                if dg.is_out_channel_pruning_fn(dep.handler):
                    visited.add(id(dep.target.module))
                    if id(dep.target.module) in ignored_ids:
                        ok = False
                items.append((dep.target.module, handler, _plain(idxs)))
            if not ok:
                continue
            if probe == "single":
                root_chunks = len({i for mod, h, idx in items if mod is m and "out" in h for i in idx}) or 1
                yield items, max(width // root_chunks, 1)
            else:
                yield items, 0


def dependency_groups(scope: nn.Module, scope_name: str, runs: list[Callable[[], Any]], names: dict[int, str],
                      ignored: list[nn.Module] = (), start_id: int = 0, probe: str = "single",
                      skip_roots: set[int] = frozenset(), grad_inputs: set[str] | None = None
                      ) -> tuple[list[PrunableGroup], dict[str, Any], Any]:
    """All torch-pruning groups of ``scope`` (named ``scope_name`` in the pipeline).

    ``runs``: ways to make the scope run at reduced resolution without grad, tried in order
    (calling it directly on inputs shaped like the traced call's; running the whole pipeline,
    for components that only work inside it, like S3Diff's LoRA that reads degradation
    matrices set by the pipeline). The graph is traced from the scope's first call: its tensor
    inputs are detached (the graph starts there) and grad is enabled only inside it; the run
    stops once the scope has returned. LoRA adapters are switched off while tracing: they
    follow their base layer (``lora_A`` its input channels, ``lora_B`` its output channels), and
    tracing them would only add rank "groups". ``names``: id of a module -> its qualified name in
    the pipeline. ``ignored``: layers whose output channels are interfaces (never roots).
    ``grad_inputs``: names of the scope's inputs on the image path; only they start the autograd
    graph (the others, e.g. a prompt embedding or SDXL's added time ids, enter as constants, so a
    concatenation of raw inputs, whose widths torch-pruning cannot infer, never enters the graph).
    Returns the groups, facts about the build (scope input shapes, time) and the graph itself.
    """
    import time

    import torch_pruning as tp

    state: dict[str, Any] = {}

    def pre(module, args, kwargs):
        if "out" in state or "grad" in state:
            return None
        state["grad"] = torch.is_grad_enabled()
        torch.set_grad_enabled(True)

        def fresh(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.detach().requires_grad_(True)  # the autograd graph exists even through frozen layers
            return t

        def const(t: Any) -> Any:
            return t.detach() if isinstance(t, torch.Tensor) else t

        if grad_inputs is None:
            args, kwargs = pytree.tree_map(fresh, tuple(args)), pytree.tree_map(fresh, dict(kwargs))
        else:
            from .dataflow import _arg_names

            pairs = _arg_names(module, args, kwargs, {})
            n_pos = len(args)
            done = [pytree.tree_map(fresh if name in grad_inputs else const, v) for name, v in pairs]
            args, kwargs = tuple(done[:n_pos]), {name: v for (name, _), v in zip(pairs[n_pos:], done[n_pos:])}
        state["shapes"] = _shape_str(args, kwargs)
        return args, kwargs

    def post(module, args, kwargs, output):
        if "out" in state:
            return None
        torch.set_grad_enabled(state.pop("grad"))
        state["out"] = _tensors(output)
        raise _Stop

    def forward_fn(model: nn.Module, _inputs: Any) -> list[torch.Tensor]:
        errors = []
        for how, run in enumerate(runs):
            state.clear()
            h1 = scope.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
            h2 = scope.register_forward_hook(post, with_kwargs=True)
            try:
                with torch.no_grad():
                    run()
            except _Stop:
                pass
            except Exception as exc:  # try the next way (e.g. a component that only runs inside its pipeline)
                errors.append(f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}")
            finally:
                h1.remove()
                h2.remove()
                if "grad" in state:
                    torch.set_grad_enabled(state.pop("grad"))
            if "out" in state:
                state["how"] = ("direct call", "pipeline run")[min(how, 1)]
                return state["out"]
        raise AdcError(f"pruning trace: could not run {scope_name} ({'; '.join(errors) or 'never called'})")

    tuner = _peft_base()
    lora = [m for m in scope.modules() if tuner is not None and isinstance(m, tuner)]
    lora_state = [getattr(m, "_disable_adapters", False) for m in lora]
    p0 = next(iter(scope.parameters()), None)
    frozen = [p for p in scope.parameters() if not p.requires_grad]
    t0 = time.perf_counter()
    dg = tp.DependencyGraph()
    try:
        for p in frozen:
            p.requires_grad_(True)
        for m in lora:
            m._disable_adapters = True
        with torch.enable_grad():
            # Interface layers are traced too (the graph is reused for pruning, where an interface's
            # inner side is pruned with its group); they are only never roots (iter_groups).
            dg.build_dependency(scope, example_inputs=None, forward_fn=forward_fn, verbose=False)
        raw = list(iter_groups(dg, list(ignored), probe, skip_roots))
    except AdcError:
        raise
    except Exception as exc:  # torch-pruning raises bare asserts and index errors on graphs it cannot map
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdcError(f"torch-pruning could not trace {scope_name} ({type(exc).__name__}: {first[:200]})") from exc
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for m, flag in zip(lora, lora_state):
            m._disable_adapters = flag
    elapsed = time.perf_counter() - t0

    names_rev = {n: m for m in scope.modules() for n in [names.get(id(m))] if n is not None}

    def display(module: nn.Module) -> tuple[str, str, bool]:
        """(row name, class, is_lora): peft's base_layer folds into its wrapper; lora_A/B are LoRA."""
        name = names.get(id(module), type(module).__name__)
        if tuner is not None:
            for anc_name, anc in _tuner_ancestors(name, names_rev):
                if isinstance(anc, tuner):
                    is_lora = name != f"{anc_name}.base_layer"
                    return anc_name, type(module).__name__, is_lora
        return name, type(module).__name__, False

    groups: list[PrunableGroup] = []
    for items, unit in raw:
        layers: list[CoupledLayer] = []
        op_types: set[str] = set()
        lora_only = True
        heads: list[str] = []
        gn: set[int] = set()
        glu = False
        idx_of: dict[tuple[str, str], set[int]] = {}
        for module, handler, plain in items:
            if not isinstance(module, nn.Module) or type(module).__module__.startswith("torch_pruning"):
                op_types.add(type(module).__name__)
                continue
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            is_out = "out" in handler
            pruner = dg.get_pruner_of_module(module)
            try:
                size = pruner.get_out_channels(module) if is_out else pruner.get_in_channels(module)
            except Exception:  # a pruner without a size query: report the coupled count instead
                size = None
            if unit:  # single-index probe: each mapped index starts a run of `unit` channels
                full = sorted({i + k for i in plain for k in range(unit)})
                plain = [i for i in full if size is None or i < size]
            name, cls, is_lora = display(module)
            if not is_lora:
                lora_only = False
            if isinstance(module, nn.GroupNorm):
                gn.add(module.num_groups)
            # the layer as its block sees it: a LoRA wrapper stands for its base layer
            wrapper = names_rev.get(name, module)
            parent = names_rev.get(name.rsplit(".", 1)[0]) if "." in name else None
            if is_out and parent is not None and hasattr(parent, "heads") and \
                    any(getattr(parent, a, None) is wrapper for a in ("to_q", "to_k", "to_v")):
                h = int(parent.heads)
                desc = f"{names.get(id(parent), '?')}: {h} heads x {int(size) // h if size else '?'}"
                if desc not in heads:
                    heads.append(desc)
            if is_out and parent is not None and "GLU" in type(parent).__name__:
                glu = True
            layer = CoupledLayer(name=name + (" [lora]" if is_lora else ""), cls=cls, dim="out" if is_out else "in",
                                 count=len(plain), size=int(size) if size is not None else len(plain), ranges="")
            layers.append(layer)
            idx_of.setdefault((layer.name, layer.dim), set()).update(plain)
        if not layers:
            continue
        # One entry per (layer, dim): a layer reached through several ops gets the union of its indices.
        merged: dict[tuple[str, str], CoupledLayer] = {}
        for layer in layers:
            merged.setdefault((layer.name, layer.dim), layer)
        layers = list(merged.values())
        for layer in layers:
            layer.count = len(idx_of[(layer.name, layer.dim)])
        channels = unit or min(layer.count for layer in layers)
        for layer in layers:
            layer.chunks = max(1, layer.count // channels) if channels else 1
            layer.ranges = _runs(sorted(idx_of[(layer.name, layer.dim)]), channels)
        tags: list[str] = []
        notes: list[str] = []
        grp = PrunableGroup(id=start_id + len(groups), scope=scope_name, root=layers[0].name,
                            channels=channels, layers=layers, tags=tags, notes=notes)
        if lora_only:
            tags.append("lora-rank")
            notes.append("LoRA rank dimension, not a channel: merge the adapters before pruning")
        if "_ConcatOp" in op_types:
            tags.append("concat")
            blocks = [b.rsplit(".", 2)[-2] if b.count(".") >= 2 else b for b in grp.blocks]
            if any(b.startswith("down") for b in blocks) and any(b.startswith("up") for b in blocks):
                tags.append("skip-concat")
                notes.append("skip connection: a down-block output is concatenated into an up-block input; "
                             "the up-block layers take it at the offsets shown")
        if any(layer.chunks > 1 for layer in layers):
            if glu:
                tags.append("geglu-halves")
                notes.append("GEGLU: proj output = [value | gate] halves, channel i couples with i + inner; a ratio "
                             "computed on proj's outputs prunes the inner width twice as fast (set a per-layer ratio)")
            else:
                tags.append("repeated")
                notes.append("a layer takes these channels at several offsets (e.g. a concat of two coupled tensors)")
        if gn:
            tags.append("groupnorm")
            notes.append(f"GroupNorm ({'/'.join(str(n) for n in sorted(gn))} groups): torch-pruning keeps the "
                         "group count and removes the same positions in every group (do not pass round_to)")
        if heads:
            tags.append("attention-heads")
            notes.append("q/k/v channels = heads x head_dim (" + "; ".join(heads[:3]) +
                         (" ..." if len(heads) > 3 else "") + "): pass num_heads and set attn.heads after pruning; "
                         "pruning head_dim changes SDPA's softmax scale")
        groups.append(grp)
    info = {"scope": scope_name, "input_shapes": state.get("shapes", "?"), "traced_by": state.get("how", "?"),
            "lora_layers_off": len(lora), "groups": len(groups),
            "seconds": round(elapsed, 2), "device": str(p0.device) if p0 is not None else "-",
            "dtype": str(p0.dtype).replace("torch.", "") if p0 is not None else "-"}
    return groups, info, dg


def _tuner_ancestors(name: str, by_name: dict[str, nn.Module]):
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        anc_name = ".".join(parts[:k])
        anc = by_name.get(anc_name)
        if anc is not None:
            yield anc_name, anc


def _shape_str(args: tuple, kwargs: dict) -> str:
    parts = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            parts.append(f"args[{i}] {tuple(a.shape)}")
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            parts.append(f"{k} {tuple(v.shape)}")
    return ", ".join(parts)

