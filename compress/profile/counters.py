"""Parameter and MAC counting for SD-based SR models.

Primary MAC counter: ``torch.utils.flop_counter.FlopCounterMode`` (a dispatch mode, so it sees
every aten op whatever the Python code looks like), reported as MACs = FLOPs / 2. By default
the count runs on **meta** tensors: the model's parameters are swapped for meta stand-ins for
the duration of the call (``torch.func.functional_call``), so a full-size SD UNet is counted in
seconds with almost no memory, and the model itself is left untouched.

fvcore and thop wrappers are kept as cross-checks only; their numbers differ from the primary
counter by design (both miss SDPA attention, thop misses everything functional). Never mix
counters in one table: every :class:`MacReport` names the counter that produced it.
"""

from __future__ import annotations

import bisect
import contextlib
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils import flop_counter as _fc

from ..errors import AdcError

__all__ = [
    "MacReport",
    "MacCounter",
    "count_params",
    "count_macs",
    "count_macs_fvcore",
    "count_macs_thop",
]

_aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def _param_key(p: torch.Tensor) -> Any:
    """Identity of a parameter's memory, so aliases count once.

    Real tensors: same storage, offset, shape and stride means the same numbers even when two
    distinct ``Parameter`` objects wrap them. Meta tensors have no storage, so fall back to
    object identity (``named_parameters`` already merges the same object registered twice).
    """
    if p.device.type == "meta":
        return ("id", id(p))
    ptr = p.untyped_storage().data_ptr()
    if ptr == 0:
        return ("id", id(p))
    return (str(p.device), ptr, p.storage_offset(), tuple(p.shape), tuple(p.stride()))


def _unique_numel(params: list[torch.Tensor]) -> int:
    seen: set = set()
    n = 0
    for p in params:
        k = _param_key(p)
        if k not in seen:
            seen.add(k)
            n += p.numel()
    return n


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def count_params(module: nn.Module, groups: dict[str, list[str]] | None = None) -> dict:
    """Count parameters in total and per component, each shared/aliased tensor once.

    Components are ``module``'s direct children by default, or ``groups``: a name -> list of
    parameter-name prefixes (``{"unet": ["unet"], "vae.decoder": ["vae.decoder",
    "vae.post_quant_conv"]}``). A tensor shared by two components counts in both, but once in
    ``total``. Returns ``{"total", "trainable", "components": {name: n}, "unassigned"}`` where
    ``unassigned`` is what no component covers (e.g. parameters held by the root itself).
    """
    if not isinstance(module, nn.Module):
        raise AdcError(f"count_params: module is {type(module).__name__}, expected a torch.nn.Module")
    named = list(module.named_parameters(remove_duplicate=False))
    if groups is None:
        # every registration name, so a module registered twice shows under both
        groups_ = {name: [name] for name, child in module._modules.items() if child is not None}
    else:
        if not isinstance(groups, dict):
            raise AdcError(f"count_params: groups is {type(groups).__name__}, expected a dict of name -> list of prefixes")
        groups_ = {}
        for gname, prefixes in groups.items():
            if isinstance(prefixes, str) or not all(isinstance(p, str) for p in prefixes):
                raise AdcError(f"count_params: groups[{gname!r}] = {prefixes!r}, expected a list of parameter-name prefixes")
            for pre in prefixes:
                if not any(_under(n, pre) for n, _ in named):
                    raise AdcError(f"count_params: groups[{gname!r}] prefix {pre!r} matches no parameter of {type(module).__name__}")
            groups_[gname] = list(prefixes)

    all_params = [p for _, p in named]
    components = {}
    covered: list[torch.Tensor] = []
    for gname, prefixes in groups_.items():
        ps = [p for n, p in named if any(_under(n, pre) for pre in prefixes)]
        covered.extend(ps)
        components[gname] = _unique_numel(ps)
    covered_keys = {_param_key(p) for p in covered}
    unassigned = _unique_numel([p for p in all_params if _param_key(p) not in covered_keys])
    return {
        "total": _unique_numel(all_params),
        "trainable": _unique_numel([p for p in all_params if p.requires_grad]),
        "components": components,
        "unassigned": unassigned,
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass
class MacReport:
    """MACs of one call, split by kind and by module, with what produced the number.

    ``conv_linear``: convolutions and matmuls with a weight operand (Linear, to_q/k/v/out,
    1x1 proj). ``attention``: activation x activation matmuls (QK^T, AV) and fused SDPA kernels.
    ``other``: anything else the counter scores (backward ops, norms for fvcore/thop).
    ``by_module``: name -> {"total", "conv_linear", "attention", "other"}; a module called twice
    is summed. All numbers are MACs (one multiply-add = 1); FLOPs are 2x.
    """

    total: int
    conv_linear: int
    attention: int
    other: int
    by_module: dict[str, dict[str, int]]
    by_op: dict[str, int]
    counter: str
    counter_version: str
    device: str
    dtype: str | None
    input_shapes: dict[str, list[int]]
    notes: list[str] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return 2 * self.total

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        scale, unit = next(((s, u) for s, u in ((1e9, "G"), (1e6, "M"), (1e3, "K")) if self.total >= s), (1, ""))
        g = lambda v: f"{v / scale:10.3f}"  # noqa: E731
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in self.input_shapes.items()) or "-"
        lines = [
            f"MACs ({unit or 'units'}) by {self.counter} {self.counter_version}, device={self.device}, dtype={self.dtype}",
            f"inputs: {shapes}",
            f"{'module':<40} {'total':>10} {'conv+lin':>10} {'attention':>10} {'other':>10}",
            f"{'(all)':<40} {g(self.total)} {g(self.conv_linear)} {g(self.attention)} {g(self.other)}",
        ]
        for name, d in self.by_module.items():
            label = name if len(name) <= 40 else "..." + name[-37:]
            lines.append(
                f"{label:<40} {g(d['total'])} {g(d['conv_linear'])} {g(d['attention'])} {g(d['other'])}"
            )
        if self.by_op:
            lines.append("by op: " + ", ".join(f"{k} {v / scale:.3f}" for k, v in self.by_op.items()))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Primary counter: FlopCounterMode with weight/activation classification
# ---------------------------------------------------------------------------------------------


def _sdpa_bhle_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of an SDPA kernel taking (B, H, L, E) q/k/v: QK^T plus AV, as torch's own formula."""
    return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    """SDPA kernels FlopCounterMode misses (pytorch #195460: the CPU flash kernel scores 0).

    Passed per counter instance through ``custom_mapping`` rather than
    ``register_flop_formula``, which would change torch's global registry.
    """
    extra = {}
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
        "_scaled_dot_product_attention_math_for_mps",
    ):
        packet = getattr(_aten, name, None)
        if packet is not None and packet not in _fc.flop_registry:
            extra[packet] = _sdpa_bhle_flop
    return extra


_CONV_OPS = {
    getattr(_aten, n)
    for n in ("convolution", "_convolution", "cudnn_convolution", "_slow_conv2d_forward", "convolution_overrideable")
    if hasattr(_aten, n)
}
# matmul-like op -> positions of its two product operands
_MATMUL_OPERANDS = {
    _aten.mm: (0, 1),
    _aten.bmm: (0, 1),
    _aten.addmm: (1, 2),
    _aten.baddbmm: (1, 2),
}
if hasattr(_aten, "_scaled_mm"):
    _MATMUL_OPERANDS[_aten._scaled_mm] = (0, 1)


# Ops FlopCounterMode would decompose into prims before counting (they are not in its registry):
# none of them multiplies matrices, so their MACs are 0 either way, but decomposing norms,
# activations, resampling and reductions multiplies the dispatched ops several times over and is
# what made counting a whole pipeline on meta slow. They run as they are.
_MAC_FREE = frozenset("""
    native_group_norm group_norm native_layer_norm layer_norm native_batch_norm batch_norm
    silu silu_ gelu gelu_ relu relu_ sigmoid tanh leaky_relu hardtanh mish softplus elu
    _softmax softmax _log_softmax log_softmax
    add add_ sub sub_ rsub mul mul_ div div_ pow sqrt rsqrt exp log neg abs clamp clamp_ clamp_min clamp_max
    where masked_fill mean sum var var_mean std std_mean amax amin
    upsample_nearest2d upsample_bilinear2d upsample_bicubic2d _upsample_bilinear2d_aa _upsample_bicubic2d_aa
    upsample_nearest2d_backward pixel_unshuffle pixel_shuffle constant_pad_nd reflection_pad2d replication_pad2d
    avg_pool2d adaptive_avg_pool2d adaptive_avg_pool1d max_pool2d_with_indices native_dropout dropout
    cat stack split split_with_sizes chunk unbind roll flip repeat tile clone _to_copy copy_ contiguous
    embedding erf cos sin floor round lerp addcmul addcdiv cumsum
""".split())


class _ClassifyingCounter(_fc.FlopCounterMode):
    """FlopCounterMode that also sorts each counted op into conv_linear / attention / other.

    Weight or activation? A matmul is attention only when *neither* operand derives from a
    weight. "Derives from a weight" is tracked by propagation through every executed op: the
    module's parameters and buffers (and any ``nn.Parameter``) are weight-derived, and an op's
    outputs are weight-derived iff it has tensor inputs and all of them are weight-derived. So
    ``t(W)``, ``W.to(bf16)`` under autocast, ``W * scale`` or a merged ``W + B @ A`` stay
    weights, while anything touched by the input (q, k, v, scores, probabilities) is an
    activation. This classifies by data flow rather than by op name, so a Linear that lowers to
    ``bmm`` is still linear and an ``mm`` of two activations is still attention, and it gives
    the same split on CPU (fused SDPA kernel) and on meta (SDPA decomposed into bmm).
    Fused SDPA kernels are attention by definition. Convolutions are always conv_linear.

    Relies on ``FlopCounterMode._count_flops`` being called for every executed op (true for
    torch 2.4 .. 2.13). Tensors fn creates itself (``torch.randn``) count as activations, and
    without a root module only ``nn.Parameter`` objects are known weights (not buffers).
    """

    def __init__(self, static: list[torch.Tensor]):
        super().__init__(display=False, custom_mapping=_extra_formulas())
        self._static: dict[int, weakref.ref] = {}
        for t in static:
            self._mark(t, True)
        self.kinds: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def _mark(self, t: torch.Tensor, static: bool) -> None:
        if static:
            self._static[id(t)] = weakref.ref(t)
        else:
            self._static.pop(id(t), None)

    def _is_static(self, t: torch.Tensor) -> bool:
        if isinstance(t, nn.Parameter):
            return True
        ref = self._static.get(id(t))
        return ref is not None and ref() is t

    def _kind(self, packet, args) -> str:
        if packet in _CONV_OPS:
            return "conv_linear"
        if packet in _MATMUL_OPERANDS:
            i, j = _MATMUL_OPERANDS[packet]
            a, b = args[i], args[j]
            return "conv_linear" if (self._is_static(a) or self._is_static(b)) else "attention"
        name = getattr(packet, "__name__", str(packet))
        if "attention" in name and "backward" not in name:
            return "attention"
        return "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = getattr(func, "_overloadpacket", None)
        if packet is not None and packet not in self.flop_registry and getattr(packet, "__name__", "") in _MAC_FREE:
            kwargs = kwargs or {}
            return self._count_flops(packet, func(*args, **kwargs), args, kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            kind = self._kind(func_packet, args)
            for par in set(self.mod_tracker.parents):
                self.flop_counts[par][func_packet] += flops
                self.kinds[par][kind] += flops
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        static = bool(ins) and all(self._is_static(t) for t in ins)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._mark(t, static)
        return out


class _Root(nn.Module):
    """Wraps fn so that ``functional_call`` can swap ``root``'s parameters and module names
    come out relative to ``root`` (``unet.down_blocks``, not the tracker's class names)."""

    def __init__(self, fn: Callable, root: nn.Module | None):
        super().__init__()
        self.__dict__["_fn"] = fn  # not a submodule even if fn is a module: root names it
        if root is not None:
            self.root = root

    def forward(self, *args, **kwargs):
        return self._fn(*args, **kwargs)


def _shapes(args: tuple, kwargs: dict) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out[prefix] = list(x.shape)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}[{i}]", v)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    for i, a in enumerate(args):
        walk(f"args[{i}]", a)
    for k, v in kwargs.items():
        walk(k, v)
    return out


def _to_meta(x: Any) -> Any:
    return pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, x)


def _dtype_name(dt: torch.dtype | None) -> str | None:
    return None if dt is None else str(dt).replace("torch.", "")


@dataclass
class MacCounter:
    """Options of the primary counter; ``count_macs`` uses the defaults.

    device: ``"meta"`` (default) counts on meta stand-ins for the inputs and for ``root``'s
        parameters and buffers, leaving the model untouched; ``None`` runs on whatever devices
        the model and inputs are on (needed when the code reads values, e.g. ``.item()``).
    depth: deepest module name kept in ``by_module`` (``vae.decoder`` is depth 2).
    root: the module whose parameters fn uses. Found automatically when the target is a module
        or a bound method of one; give it for plain functions/lambdas so parameters can be moved
        to meta, recognised as weights, and module names are relative to it.
    """

    device: str | None = "meta"
    depth: int = 2
    root: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.device not in ("meta", None):
            raise AdcError(f"MacCounter: device={self.device!r}, expected 'meta' or None")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise AdcError(f"MacCounter: depth={self.depth!r}, expected an int >= 1")

    def count(self, fn_or_module: Callable, /, *args, **kwargs) -> MacReport:
        if not hasattr(_fc.FlopCounterMode, "_count_flops"):
            raise AdcError(f"count_macs: torch {torch.__version__} FlopCounterMode lacks _count_flops; needs torch >= 2.4")
        if not callable(fn_or_module):
            raise AdcError(f"count_macs: target is {type(fn_or_module).__name__}, expected a module or callable")
        root = self.root
        if root is None:
            if isinstance(fn_or_module, nn.Module):
                root = fn_or_module
            elif isinstance(getattr(fn_or_module, "__self__", None), nn.Module):
                root = fn_or_module.__self__
        wrapper = _Root(fn_or_module, root)
        input_shapes = _shapes(args, kwargs)

        state: dict[str, torch.Tensor] = {}
        if root is not None:
            state = dict(root.named_parameters(prefix="root", remove_duplicate=False))
            state.update(root.named_buffers(prefix="root", remove_duplicate=False))
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
        if dtype is None:
            dtype = next(
                (t.dtype for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()),
                None,
            )

        swap = None
        if self.device == "meta":
            args, kwargs = _to_meta(args), _to_meta(kwargs)
            if any(t.device.type != "meta" for t in state.values()):
                # one meta stand-in per distinct tensor, so tied weights stay tied
                memo: dict[int, torch.Tensor] = {}
                swap = {k: memo.setdefault(id(t), t.to("meta")) for k, t in state.items()}
                state = swap
        counter = _ClassifyingCounter(list(state.values()))
        try:
            # on meta, tensors that fn creates without a device (torch.tensor([t])) are meta too
            with torch.no_grad(), (torch.device("meta") if self.device == "meta" else contextlib.nullcontext()), counter:
                if swap is not None:
                    torch.func.functional_call(wrapper, swap, args, kwargs, tie_weights=False, strict=False)
                else:
                    wrapper(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as e:
            if self.device != "meta":
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdcError(
                f"count_macs: the call failed on meta tensors ({first[:200]}); tensors held outside "
                f"the root module or made on an explicit device stay real: pass "
                f"MacCounter(root=<module fn uses>), or device=None to count on the real device"
            ) from e
        order = {} if root is None else {n: i for i, (n, _) in enumerate(root.named_modules(remove_duplicate=False))}
        return self._report(counter, input_shapes, dtype, root is not None, order)

    def _report(self, counter: _ClassifyingCounter, input_shapes, dtype, rooted: bool, order: dict) -> MacReport:
        glob = counter.kinds.get("Global", {})
        rname = _Root.__name__
        # tracker names -> names relative to root ("unet.down_blocks.0")
        tracked: dict[str, dict[str, int]] = {}
        for name, k in counter.kinds.items():
            if name in ("Global", rname):
                continue
            if rooted:
                if not name.startswith(f"{rname}.root."):
                    continue
                short = name[len(f"{rname}.root."):]
            else:
                short = name[len(rname) + 1:] if name.startswith(rname + ".") else name
            tracked[short] = dict(k)
        # Containers that are never called (ModuleList down_blocks, up_blocks) get the sum of
        # their outermost called descendants, so each level of the hierarchy adds up.
        called = dict(tracked)
        # sorted names: the descendants of "a.b" are one contiguous run starting at "a.b."
        # (found by bisection: whole pipelines have thousands of modules, a scan each is quadratic)
        ranked = sorted(called)
        for name in order:
            if not name or name in called:
                continue
            pre = name + "."
            lo = bisect.bisect_left(ranked, pre)
            hi = lo
            while hi < len(ranked) and ranked[hi].startswith(pre):
                hi += 1
            desc = ranked[lo:hi]
            inside = set(desc)
            top = [d for d in desc if not any(a in inside for a in _ancestors(d, len(pre)))]
            if top:
                agg: dict[str, int] = defaultdict(int)
                for d in top:
                    for kind, v in called[d].items():
                        agg[kind] += v
                tracked[name] = dict(agg)
        by_module: dict[str, dict[str, int]] = {}
        # definition order of root's modules (close to execution order), else by name
        for short in sorted(tracked, key=lambda n: (order.get(n, len(order)), n)):
            if short.count(".") + 1 > self.depth:
                continue
            k = tracked[short]
            by_module[short] = {
                "total": _macs(sum(k.values())),
                "conv_linear": _macs(k.get("conv_linear", 0)),
                "attention": _macs(k.get("attention", 0)),
                "other": _macs(k.get("other", 0)),
            }
        by_op = {
            getattr(op, "__name__", str(op)): _macs(v)
            for op, v in sorted(counter.flop_counts.get("Global", {}).items(), key=lambda kv: -kv[1])
        }
        notes = ["MACs = FlopCounterMode FLOPs / 2; norms, activations, softmax and resampling are not counted"]
        if not rooted:
            notes.append("no root module: only nn.Parameter objects are known as weights, module names are class-based")
        return MacReport(
            total=_macs(sum(glob.values())),
            conv_linear=_macs(glob.get("conv_linear", 0)),
            attention=_macs(glob.get("attention", 0)),
            other=_macs(glob.get("other", 0)),
            by_module=by_module,
            by_op=by_op,
            counter="torch.utils.flop_counter.FlopCounterMode",
            counter_version=torch.__version__,
            device=self.device or "as given",
            dtype=_dtype_name(dtype),
            input_shapes=input_shapes,
            notes=notes,
        )


def _ancestors(name: str, start: int) -> list[str]:
    """Proper prefixes of dotted ``name`` that end at a dot at or after index ``start``."""
    return [name[:i] for i in range(start, len(name)) if name[i] == "."]


def _macs(flops: int) -> int:
    return int(flops) // 2


def count_macs(fn_or_module: Callable, /, *args, **kwargs) -> MacReport:
    """MACs of ``fn_or_module(*args, **kwargs)`` with the default :class:`MacCounter` (on meta).

    For other options (count on the real device, deeper ``by_module``, a root module for a
    plain function) use ``MacCounter(...).count(fn, *args, **kwargs)``.
    """
    return MacCounter().count(fn_or_module, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Cross-check counters
# ---------------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _first_dtype(module: nn.Module) -> str | None:
    return _dtype_name(next((p.dtype for p in module.parameters() if p.is_floating_point()), None))


def _device_of(module: nn.Module, args: tuple) -> str:
    t = next(module.parameters(), None)
    if t is None:
        t = next((a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)), None)
    return str(t.device) if t is not None else "cpu"


def count_macs_fvcore(module: nn.Module, *args) -> MacReport:
    """Cross-check with fvcore ``FlopCountAnalysis`` (jit trace; its "flop" is one MAC).

    Split by op name only: conv/linear/addmm/mm/matmul -> conv_linear, bmm/einsum ->
    attention, everything else (norms, upsample, pooling) -> other. fvcore cannot see SDPA
    ("unsupported operator") nor ``baddbmm``, and takes positional inputs only.
    """
    from fvcore.nn import FlopCountAnalysis

    if not isinstance(module, nn.Module):
        raise AdcError(f"count_macs_fvcore: target is {type(module).__name__}, expected a torch.nn.Module")
    with torch.no_grad():
        fca = FlopCountAnalysis(module, args if len(args) != 1 else args[0])
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_op = {k: int(v) for k, v in fca.by_operator().items()}
        total = int(fca.total())
        by_mod = fca.by_module()
        unsupported = dict(fca.unsupported_ops())
    lin = sum(v for k, v in by_op.items() if k in ("conv", "linear", "addmm", "mm", "matmul"))
    att = sum(v for k, v in by_op.items() if k in ("bmm", "einsum"))
    children = [n for n, _ in module.named_children()]
    notes = ["fvcore split is by op name; matmul counted as linear"]
    if unsupported:
        notes.append("unsupported (not counted): " + ", ".join(f"{k} x{v}" for k, v in sorted(unsupported.items())))
    return MacReport(
        total=total,
        conv_linear=lin,
        attention=att,
        other=total - lin - att,
        by_module={n: {"total": int(by_mod.get(n, 0))} for n in children},
        by_op=by_op,
        counter="fvcore.nn.FlopCountAnalysis",
        counter_version=_version("fvcore"),
        device=_device_of(module, args),
        dtype=_first_dtype(module),
        input_shapes=_shapes(args, {}),
        notes=notes,
    )


def count_macs_thop(module: nn.Module, *args) -> MacReport:
    """Cross-check with thop ``profile`` (module hooks, MACs; BK-SDM's counter).

    Only ``nn.Module`` leaves with a thop rule are scored: functional attention (SDPA,
    bmm), GroupNorm and ``F.interpolate`` count 0. conv_linear sums the Conv*/Linear leaves;
    other is the rest thop scores (BN/LN, pooling, upsample modules).
    """
    import thop

    if not isinstance(module, nn.Module):
        raise AdcError(f"count_macs_thop: target is {type(module).__name__}, expected a torch.nn.Module")
    had = {m: {k for k in ("total_ops", "total_params") if k in m._buffers} for m in module.modules()}
    try:
        total, _, tree = thop.profile(module, inputs=args, verbose=False, ret_layer_info=True)
    finally:
        # thop removes its buffers only from modules it has a rule for; the rest (the root,
        # containers, unknown layers) would keep total_ops/total_params in their state_dict
        for m, keep in had.items():
            for k in ("total_ops", "total_params"):
                if k not in keep:
                    m._buffers.pop(k, None)

    lin_types = (nn.modules.conv._ConvNd, nn.Linear)

    def walk(mod: nn.Module, sub: dict) -> int:
        s = 0
        for name, child in mod.named_children():
            if name not in sub:
                continue
            ops, _, nxt = sub[name]
            s += int(ops) if isinstance(child, lin_types) else walk(child, nxt)
        return s

    lin = walk(module, tree)
    total = int(total)
    return MacReport(
        total=total,
        conv_linear=lin,
        attention=0,
        other=total - lin,
        by_module={n: {"total": int(v[0])} for n, v in tree.items()},
        by_op={},
        counter="thop.profile",
        counter_version=getattr(thop, "__version__", _version("thop")),
        device=_device_of(module, args),
        dtype=_first_dtype(module),
        input_shapes=_shapes(args, {}),
        notes=["thop ignores functional ops: attention matmuls, GroupNorm and F.interpolate count 0"],
    )
