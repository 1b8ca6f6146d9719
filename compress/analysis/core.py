"""Classify every module of a pipeline as removable, foldable, prunable or keep, with a reason.

The classification is derived from the traced dataflow (:mod:`.dataflow`) and the task facts
(:mod:`.facts`), not from module names, so it carries over from one family's pipeline to another:

removable
    * a prompt source (the tagger) when the prompt is fixed or dropped;
    * a module whose inputs are only the dropped prompt (text encoder, ``to_k``/``to_v``);
    * the innermost module that mixes the dropped prompt into the image path, when its output
      is *added* back (a residual bypass), so deleting it leaves a valid network (``attn2``);
    * a module whose output no longer reaches the pipeline output (``norm2`` before ``attn2``),
      or that is never called;
    * a re-encoder: what maps the image input to the denoiser's input with nothing else
      feeding in (the VAE encoder), replaceable by ``PixelUnshuffle`` + a conv.
    The replay that decides this recomputes the labels as if removed modules were gone, so the
    second cross-attention is judged on the image path *after* the first one was cut.
foldable
    every input depends only on constants (timestep 999, a fixed prompt, parameters): its value
    can be computed once; where it meets the image path by an addition it folds exactly into the
    bias of the layer on the other side (``time_emb_proj`` -> ``conv1.bias``).
keep
    interfaces of the pruning scopes (first/last conv whose channel count is fixed by the
    pipeline) and live modules outside the pruning scopes (e.g. the text encoder when the
    prompt is variable).
prunable
    layers of a pruning scope whose channels appear in torch-pruning dependency groups.
"""

from __future__ import annotations

import time
from collections import defaultdict
import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import AdcError
from ..log import get_logger
from .dataflow import Trace, trace
from .facts import CONSTANT, DROPPED, PROMPT, VARIABLE, TaskFacts
from .groups import PrunableGroup, dependency_groups, reduce_spatial, reduced_example, reduced_inputs

log = get_logger("analysis")

CLASSES = ("removable", "foldable", "prunable", "keep")
_ADD_OPS = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "sub_", "__isub__"}
_CHANNEL_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class Row:
    """One module of the pipeline and what the compressed model can do with it.

    ``params``/``macs``: the whole subtree. ``own_params``/``own_macs``: the share this row
    accounts for in the summary (its direct parameters, or the whole subtree when the row is
    collapsed; its MACs minus those of its child rows), so the summary adds up exactly.
    """

    module: str
    component: str
    cls: str
    depth: int
    params: int
    own_params: int
    macs: int
    own_macs: int
    classification: str
    reason: str
    depends_on: str
    calls: int
    groups: str
    leaf: bool


@dataclass
class Analysis:
    """Rows for every module, the prunable groups, and how every number was obtained."""

    model: str
    facts: TaskFacts
    rows: list[Row]
    groups: list[PrunableGroup]
    info: dict[str, Any] = field(default_factory=dict)
    plan: Any = None  # compress.analysis.plan.Plan

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.module == name:
                return r
        raise KeyError(name)

    def classification(self, name: str) -> str:
        return self.row(name).classification

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.rows], columns=list(Row.__dataclass_fields__))

    def groups_frame(self):
        import pandas as pd

        recs = []
        for g in self.groups:
            for layer in g.layers:
                recs.append({"group": g.id, "scope": g.scope, "group_channels": g.channels, "tags": " ".join(g.tags),
                             **asdict(layer)})
        return pd.DataFrame(recs, columns=["group", "scope", "group_channels", "tags", "name", "cls", "dim",
                                           "count", "size", "ranges", "chunks", "role"])

    def summary(self):
        """Parameters and MACs per class (sums of the rows' own shares), plus the unattributed MACs."""
        import pandas as pd

        total_p = sum(r.own_params for r in self.rows)
        total_m = self.info.get("macs_total", sum(r.own_macs for r in self.rows))
        recs = []
        for c in CLASSES:
            rows = [r for r in self.rows if r.classification == c]
            p = sum(r.own_params for r in rows)
            m = sum(r.own_macs for r in rows)
            recs.append({"class": c, "params": p, "params_pct": 100.0 * p / total_p if total_p else 0.0,
                         "macs": m, "macs_pct": 100.0 * m / total_m if total_m else 0.0,
                         "leaf_rows": sum(1 for r in rows if r.leaf)})
        un = total_m - sum(r.own_macs for r in self.rows)
        recs.append({"class": "(outside modules)", "params": 0, "params_pct": 0.0, "macs": un,
                     "macs_pct": 100.0 * un / total_m if total_m else 0.0, "leaf_rows": 0})
        recs.append({"class": "total", "params": total_p, "params_pct": 100.0, "macs": total_m,
                     "macs_pct": 100.0, "leaf_rows": sum(1 for r in self.rows if r.leaf)})
        return pd.DataFrame(recs)


# ---------------------------------------------------------------------------------------------
# Bundle and inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class _NoMacs:
    """Stands for the counter's report when MACs are not counted."""

    total: int = 0
    attention: int = 0
    by_module: dict = field(default_factory=dict)
    counter: str = "none (macs=False)"
    counter_version: str = ""
    dtype: str | None = None


class SingleComponent(nn.Module):
    """Wraps a bare denoiser so that it is a one-component pipeline named ``unet``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, **kwargs):
        return self.unet(**kwargs)

    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}


def _is_denoiser(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv_in", "down_blocks", "up_blocks", "conv_out"))


def as_bundle(bundle: Any) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(pipeline module, {component name: module}); a bare UNet becomes a one-component pipeline."""
    if not isinstance(bundle, nn.Module):
        raise AdcError(f"analyse: the model is a {type(bundle).__name__}, expected a torch.nn.Module pipeline")
    if _is_denoiser(bundle) and not hasattr(bundle, "components"):
        bundle = SingleComponent(bundle)
    comps: dict[str, nn.Module] = {}
    getter = getattr(bundle, "components", None)
    if callable(getter):
        got = getter()
        if not isinstance(got, dict):
            raise AdcError(f"analyse: {type(bundle).__name__}.components() returned {type(got).__name__}, expected a dict")
        comps = {k: v for k, v in got.items() if isinstance(v, nn.Module)}
    else:
        comps = {k: v for k, v in bundle.named_children()}
    if not comps:
        raise AdcError(f"analyse: {type(bundle).__name__} is not a pipeline the analyser knows "
                       f"(no components() and no child modules)")
    return bundle, comps


def _inputs(example_inputs: Any, facts: TaskFacts) -> dict[str, Any]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = {facts.variable[0]: example_inputs}
    if not isinstance(example_inputs, dict):
        raise AdcError(f"analyse: example_inputs is a {type(example_inputs).__name__}, expected a dict of "
                       f"forward keyword arguments (e.g. {{'lr': tensor}})")
    missing = [v for v in facts.variable if v not in example_inputs]
    if missing:
        raise AdcError(f"analyse: the variable input(s) {missing} are not in example_inputs "
                       f"({', '.join(example_inputs) or 'empty'})")
    return dict(example_inputs)


def component_paths(bundle: nn.Module, comps: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Module paths of each component (a container built on the fly, like a family's
    ``nn.ModuleDict({"encoder": vae.encoder, ...})``, stands for its children)."""
    names: dict[int, str] = {}
    for n, m in bundle.named_modules():
        names.setdefault(id(m), n)
    out: dict[str, list[str]] = {}
    for k, m in comps.items():
        if id(m) in names:
            out[k] = [names[id(m)]]
        else:
            kids = [names[id(c)] for c in m.children() if id(c) in names]
            if not kids:
                raise AdcError(f"analyse: component {k!r} of {type(bundle).__name__} is not one of its submodules")
            out[k] = kids
    return out


def _resolve(facts: TaskFacts, bundle: nn.Module, comps: dict[str, nn.Module]) -> TaskFacts:
    """Facts that name components (``vae.encoder``) rewritten to module paths; unknown names dropped."""
    from dataclasses import replace

    paths = component_paths(bundle, comps)
    modules = {n for n, _ in bundle.named_modules()}

    def res(name: str) -> list[str]:
        if name in modules:
            return [name]
        return paths.get(name, [])

    return replace(facts,
                   prompt_sources=tuple(p for n in facts.prompt_sources for p in res(n)),
                   prompt_encoders=tuple(p for n in facts.prompt_encoders for p in res(n)),
                   edges=tuple((a, b) for s_, d in facts.edges for a in res(s_) for b in res(d)),
                   prune_scopes=None if facts.prune_scopes is None else
                   tuple(p for n in facts.prune_scopes for p in (res(n) or [n])))


def _device_of(bundle: nn.Module) -> torch.device:
    p = next(iter(bundle.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _to_meta(x: Any) -> Any:
    return pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, x)


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------


def analyse(bundle: Any, facts: TaskFacts | None = None, example_inputs: Any = None, *, model: str | None = None,
            device: str | None = "meta", prune: bool = True, min_side: int = 16, probe: str = "single",
            macs: bool = True, call: Callable[..., Any] | None = None, keep: Sequence[str] = (),
            extra_scopes: Sequence[str] = ()) -> Analysis:
    """Trace ``bundle(**example_inputs)`` and classify every module (see the module docstring).

    The result carries its :class:`~compress.analysis.plan.Plan` (``analysis.plan``): what
    ``remove``/``fold``/``prune`` do, with the dependency graphs they reuse.

    device: ``"meta"`` (default) traces and counts on meta stand-ins (the model is untouched and
        nothing is allocated); ``None`` runs on the model's own device (needed only when its
        forward reads values). Pruning groups are built on the model's own parameters (meta if
        it was built on meta) at a reduced resolution (``min_side`` for 4-D inputs).
    prune: build the torch-pruning groups.
    macs: count MACs (in the same forward pass as the trace); ``False`` classifies only (MACs are 0).
    probe: ``"single"`` (default, fast) or ``"full"`` index probing of the groups (see
        :func:`compress.analysis.groups.iter_groups`); both give the same groups.
    call: ``call(bundle, **inputs)`` runs one inference instead of ``bundle(**inputs)`` (e.g. a
        prompt extractor whose output reaches the pipeline only through a tokenizer).
    keep: glob patterns of pipeline paths the plan must keep (a recipe override: a module the
        analysis would remove, fold or prune stays as it is); each must match a module.
    extra_scopes: modules to prune besides the automatic scopes (a recipe override: they must be
        live networks on the image path that the analysis keeps).
    """
    facts = facts if facts is not None else TaskFacts()
    if not isinstance(facts, TaskFacts):
        raise AdcError(f"analyse: facts is a {type(facts).__name__}, expected a TaskFacts")
    if device not in ("meta", None):
        raise AdcError(f"analyse: device={device!r}, expected 'meta' or None")
    bundle, comps = as_bundle(bundle)
    names = [n for n, _ in bundle.named_modules()]
    for pat in keep:  # a recipe override that names nothing is a typo: say so before tracing
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise AdcError(f"analyse.keep: {pat!r} matches no module of the pipeline")
    if example_inputs is None:
        raise AdcError("analyse: example_inputs is required (e.g. {'lr': torch.zeros(1, 3, 128, 128)})")
    inputs = _inputs(example_inputs, facts)
    facts = _resolve(facts, bundle, comps)
    timings: dict[str, float] = {}

    # One forward pass gives both the dataflow (our TorchFunctionMode) and the MACs (the project's
    # counter, a TorchDispatchMode, with ``root=bundle`` so module names match ours).
    from compress.profile.counters import MacCounter

    result: dict[str, Trace] = {}

    def traced(**kw: Any) -> Any:
        result["trace"] = trace(bundle, facts, kw, call_fn=(lambda b, i: call(b, **i)) if call else None)
        return None

    def count(dev: str | None, inp: dict) -> Any:
        if not macs and dev is None:
            with torch.no_grad():
                traced(**inp)
            return _NoMacs()
        return MacCounter(device=dev, depth=64, root=bundle).count(traced, **inp)

    t0 = time.perf_counter()
    mac_notes: list[str] = []
    on_meta = all(t.device.type == "meta" for t in list(bundle.parameters()) + list(bundle.buffers()))
    try:
        if device is None:
            report = count(None, inputs)
        elif on_meta:
            # Already on meta: run as given, so tensors the forward makes itself stay where its code
            # puts them (a noise schedule read as a CPU scalar with .item()).
            report = count(None, _to_meta(inputs))
        else:
            try:
                report = count("meta", inputs)  # meta stand-ins for the real weights: nothing allocated
            except AdcError as exc:
                mac_notes.append(f"traced and counted on the real device: the meta run failed ({str(exc)[:120]})")
                report = count(None, inputs)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdcError(f"analyse: {type(bundle).__name__} forward failed while tracing: {first[:200]}") from exc
    tr = result["trace"]
    timings["trace_and_macs_s"] = time.perf_counter() - t0
    log.info(f"analyse {model or type(bundle).__name__}: traced and counted in {timings['trace_and_macs_s']:.1f} s")
    traced_on = "meta" if (device == "meta" and not mac_notes) else str(_device_of(bundle))

    c = _Classifier(bundle, comps, facts, tr, report, model or type(bundle).__name__)
    c.notes.extend(mac_notes)
    c.probe, c.pruned = probe, prune
    c.extra_scopes = list(extra_scopes)
    c.classify()
    t0 = time.perf_counter()
    dev = _device_of(bundle)
    on_dev = pytree.tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, inputs)
    groups, builds, graphs = c.prune(on_dev, min_side) if prune else ([], [], {})
    timings["pruning_groups_s"] = time.perf_counter() - t0
    if prune:
        log.info(f"analyse {c.model}: {len(groups)} pruning groups in {timings['pruning_groups_s']:.1f} s")
    rows = c.rows(groups)
    _apply_keep(rows, list(keep), c.notes)
    info = {
        "macs_total": report.total,
        "macs_attention": report.attention,
        "counter": f"{report.counter} {report.counter_version} (MACs = FLOPs / 2)",
        "mac_device": traced_on,
        "dtype": report.dtype or str(next(iter(bundle.parameters())).dtype).replace("torch.", ""),
        "input_shapes": {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)},
        "trace_device": traced_on,
        "pruning_builds": builds,
        "re_encoder": c.reencoder_info,
        "components": c.comp_paths,
        "scopes": list(c.scopes),
        "interfaces": dict(c.interfaces),
        "extra_scopes": list(extra_scopes),
        "graphs": graphs,
        "mac_report": report if macs else None,  # the counter's report (by module, depth 64): reused by profiling
        "notes": c.notes,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    result = Analysis(model=c.model, facts=facts, rows=rows, groups=groups, info=info)
    from .plan import build_plan

    result.plan = build_plan(result, list(keep))
    return result


def _apply_keep(rows: list[Row], keep: list[str], notes: list[str]) -> None:
    """A recipe's ``keep`` override: matching modules (and what is inside them) become ``keep``."""
    from .plan import matches

    for r in rows:
        pat = matches(r.module, keep)
        if pat is not None and not r.reason.startswith("kept by the recipe"):
            was = f"{r.classification}: {r.reason}" if r.classification != "keep" else r.reason
            r.classification, r.reason = "keep", f"kept by the recipe (analyse.keep {pat!r}); the analysis said {was}"
    if keep:
        notes.append(f"kept by the recipe: {', '.join(keep)}")


class _Classifier:
    def __init__(self, bundle: nn.Module, comps: dict[str, nn.Module], facts: TaskFacts, tr: Trace, report, model: str):
        self.bundle, self.facts, self.tr, self.report, self.model = bundle, facts, tr, report, model
        self.modules: dict[str, nn.Module] = dict(bundle.named_modules())  # first name of each module
        self.names: dict[int, str] = {}
        for n, m in bundle.named_modules():
            self.names.setdefault(id(m), n)
        self.comp_paths: dict[str, list[str]] = component_paths(bundle, comps)
        self.calls_of: dict[str, list[int]] = defaultdict(list)
        for call in tr.calls:
            self.calls_of[call.name].append(call.idx)
        self.depth = {}
        for call in tr.calls:
            self.depth[call.idx] = 0 if call.parent is None else self.depth[call.parent] + 1
        self.verdict: dict[str, tuple[str, str]] = {}  # module name -> (class, reason)
        self.notes: list[str] = []
        self.reencoder_info: dict[str, Any] = {}
        self.scopes: list[str] = []
        self.interfaces: dict[str, str] = {}
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner = BaseTunerLayer
        except Exception:  # no peft: no LoRA wrappers to treat as one layer
            self._tuner = None

    # ------------------------------------------------------------------ helpers
    def kinds(self, labels) -> set[str]:
        return {self.facts.kind_of(lab) for lab in labels}

    def image_labels(self) -> set[str]:
        return set(self.facts.variable)

    def inside(self, call: int | None, anc: int) -> bool:
        while call is not None:
            if call == anc:
                return True
            call = self.tr.calls[call].parent
        return False

    def is_unit(self, m: nn.Module) -> bool:
        """A leaf with parameters, or a LoRA-wrapped layer (base + adapters count as one layer)."""
        if self._tuner is not None and isinstance(m, self._tuner):
            return True
        return any(True for _ in m.parameters(recurse=False)) and not any(
            any(True for _ in c.parameters()) for c in m.children())

    def component_of(self, name: str) -> str:
        best, best_len = "", -1
        for comp, paths in self.comp_paths.items():
            for path in paths:
                if (name == path or name.startswith(path + ".") or path == "") and len(path) > best_len:
                    best, best_len = comp, len(path)
        return best

    def top_call(self, call: int | None) -> int | None:
        """The outermost call below the pipeline's own call."""
        chain = self.tr.ancestors(call)
        if not chain:
            return None
        if self.tr.calls[chain[-1]].name == "" and len(chain) > 1:
            return chain[-2]
        return chain[-1] if self.tr.calls[chain[-1]].name != "" else None

    def labels_str(self, labels) -> str:
        return ",".join(sorted(labels)) if labels else "-"

    # ------------------------------------------------------------------ classification
    def classify(self) -> None:
        self._replay()
        self._liveness()
        self._module_removals()
        self._reencoder()
        self._foldable()
        self._scopes()

    def _replay(self) -> None:
        """Recompute labels in execution order with removed modules' outputs absent; decide removals."""
        tr, facts = self.tr, self.facts
        cut: dict[int, frozenset] = dict(tr.input_labels)
        removed: dict[int, str] = {}
        mixes: set[int] = set()
        mixing_desc: set[int] = set()
        active: list[int] = []
        arg_labels: dict[int, dict[str, frozenset]] = {}
        empty = frozenset()
        for kind, i in tr.events:
            if kind == "op":
                lab = empty.union(*(cut.get(u, empty) for u in tr.op_ins[i]))
                for u in tr.op_outs[i]:
                    cut[u] = cut.get(u, empty) | lab
            elif kind == "start":
                call = tr.calls[i]
                if call.added:
                    for u in call.input_uids:
                        cut[u] = cut.get(u, empty) | call.added
                al = {a: empty.union(*(cut.get(u, empty) for u in us)) for a, us in call.inputs.items() if us}
                arg_labels[i] = al
                if any(a in removed for a in active):
                    removed[i] = "inside"
                elif call.prompt_source and facts.prompt != "variable":
                    removed[i] = "prompt-source"
                else:
                    ks = [self.kinds(v) for v in al.values()]
                    pure_d = any(DROPPED in k and VARIABLE not in k for k in ks)
                    has_v = any(VARIABLE in k for k in ks)
                    if pure_d and not has_v:
                        removed[i] = "prompt-only"
                    elif pure_d and has_v:
                        mixes.add(i)
                active.append(i)
            else:  # end
                active.pop()
                call = tr.calls[i]
                if i in mixes:
                    for a in tr.ancestors(call.parent):
                        mixing_desc.add(a)
                    if i not in mixing_desc and i not in removed and self._bypass(i, cut):
                        removed[i] = "mixes"
                if call.prompt_source:
                    for u in call.outputs:
                        cut[u] = frozenset({PROMPT})
                elif removed.get(i) == "mixes":
                    # Deleted: its output, added back to the residual stream, is simply absent.
                    ins = set(call.input_uids)
                    for u in call.outputs:
                        if u not in ins:
                            cut[u] = empty
        unresolved = [i for i in mixes if i not in removed and i not in mixing_desc]
        for i in unresolved:
            self.notes.append(f"{tr.calls[i].name or 'pipeline'} mixes the dropped prompt into the image path "
                              f"without a residual bypass: dropping the prompt there needs a code change")
        self.cut, self.removed_calls, self.arg_labels = cut, removed, arg_labels

    def _bypass(self, i: int, cut: dict) -> bool:
        """Is every use of call ``i``'s output an addition to an image-path tensor (a residual)?"""
        tr = self.tr
        call = tr.calls[i]
        ins = set(call.input_uids)
        for u in call.outputs:
            if u in ins:
                continue
            for j in tr.consumers.get(u, []):
                if self.inside(tr.op_call[j], i):
                    continue
                if tr.op_names[j] not in _ADD_OPS:
                    return False
                others = [v for v in tr.op_ins[j] if v != u]
                if not any(VARIABLE in self.kinds(cut.get(v, frozenset())) for v in others):
                    return False
        return True

    def _removed_op(self, j: int) -> bool:
        c = self.tr.op_call[j]
        memo = self.__dict__.setdefault("_rm_memo", {})
        if c not in memo:
            memo[c] = any(a in self.removed_calls for a in self.tr.ancestors(c))
        return memo[c]

    def _liveness(self) -> None:
        """Ops and calls on a path to the pipeline output (removed calls cut); edges bridge non-tensor steps."""
        tr = self.tr
        live_ops: set[int] = set()
        stack = list(tr.output_uids)
        seen: set[int] = set()

        def walk(stack: list[int]) -> None:
            while stack:
                u = stack.pop()
                if u in seen:
                    continue
                seen.add(u)
                for j in tr.producers.get(u, []):
                    if j in live_ops or self._removed_op(j):
                        continue
                    live_ops.add(j)
                    stack.extend(tr.op_ins[j])

        walk(stack)
        edges = list(self.facts.edges) + [(s, e) for s in self.facts.prompt_sources for e in self.facts.prompt_encoders]
        children: dict[int, list[int]] = defaultdict(list)
        for call in tr.calls:
            if call.parent is not None:
                children[call.parent].append(call.idx)
        forced: set[int] = set()
        changed = True
        while changed:
            changed = False
            live_calls = self._calls_of_ops(live_ops) | forced
            for src, dst in edges:
                if not any(i in live_calls for i in self.calls_of.get(dst, [])):
                    continue
                for i in self.calls_of.get(src, []):
                    if i in forced or i in self.removed_calls:
                        continue
                    sub = [i]
                    k = 0
                    while k < len(sub):
                        sub.extend(children[sub[k]])
                        k += 1
                    forced.update(sub)
                    subset = set(sub)
                    ops = [j for j, c in enumerate(tr.op_call) if c in subset]
                    live_ops.update(ops)
                    walk([v for j in ops for v in tr.op_ins[j]])
                    changed = True
        self.live_ops = live_ops
        self.live_calls = self._calls_of_ops(live_ops) | forced

    def _calls_of_ops(self, ops: set[int]) -> set[int]:
        out: set[int] = set()
        for j in ops:
            out.update(self.tr.ancestors(self.tr.op_call[j]))
        return out

    def _module_removals(self) -> None:
        tr = self.tr
        for src in self.facts.prompt_sources:
            ran = "" if self.calls_of.get(src) else " (not run in this trace: the pipeline had no tag list/tokenizer)"
            if not self.calls_of.get(src):
                self.notes.append(f"{src} was not run in this trace (the pipeline builds no prompt without a tag "
                                  f"list and tokenizer), so its MACs are 0 here; its parameters are counted")
            if self.facts.prompt == "variable":
                self.verdict[src] = ("keep", "computes the per-image (variable) prompt; outside the pruning scopes" + ran)
            else:
                self.verdict[src] = ("removable", f"produces the prompt; with a {self.facts.prompt} prompt it no longer "
                                     f"comes from this module{ran}")
        why = {"prompt-source": "produces the prompt; with a {p} prompt it no longer comes from this module",
               "prompt-only": "its inputs are only the dropped prompt ({args}); nothing on the image path needs its output",
               "mixes": "mixes the dropped prompt into the image path ({args}); its output is only added back to the "
                        "residual stream, so deleting it leaves a valid network (AdcSR deletes it)"}
        for name, idxs in self.calls_of.items():
            if name in self.verdict:
                continue
            outer = [next((a for a in tr.ancestors(tr.calls[i].parent) if self.removed_calls.get(a) not in (None, "inside")),
                          None) for i in idxs]
            if all(a is not None for a in outer):
                self.verdict[name] = ("removable", f"inside {tr.calls[outer[0]].name}, which is removed")
                continue
            rs = [self.removed_calls.get(i) for i in idxs]
            if all(rs):
                kinds = [r for r in rs if r != "inside"]
                if kinds:
                    i = idxs[rs.index(kinds[0])]
                    args = ", ".join(f"{a}: {self.labels_str(v)}" for a, v in self.arg_labels.get(i, {}).items())
                    self.verdict[name] = ("removable", why[kinds[0]].format(p=self.facts.prompt, args=args))
                else:
                    anc = next((a for a in tr.ancestors(tr.calls[idxs[0]].parent)
                                if self.removed_calls.get(a) not in (None, "inside")), None)
                    self.verdict[name] = ("removable", f"inside {tr.calls[anc].name}, which is removed" if anc is not None
                                          else "inside a removed module")
            elif not any(i in self.live_calls for i in idxs) and name != "":
                consumers = self._consumer_names(idxs)
                self.verdict[name] = ("removable", "its output does not reach the pipeline output" +
                                      (f" (it only feeds {consumers}, removed)" if consumers else ""))

    def _consumer_names(self, idxs: list[int]) -> str:
        tr = self.tr
        out: list[str] = []
        for i in idxs:
            for u in tr.calls[i].outputs:
                for j in tr.consumers.get(u, []):
                    if self.inside(tr.op_call[j], i):
                        continue
                    c = tr.op_call[j]
                    rem = next((a for a in tr.ancestors(c) if a in self.removed_calls), None)
                    nm = tr.calls[rem].name if rem is not None else (tr.calls[c].name if c is not None else "pipeline")
                    if nm not in out:
                        out.append(nm)
        return ", ".join(out[:3]) + (" ..." if len(out) > 3 else "")

    # ------------------------------------------------------------------ re-encoder
    def _params(self, m: nn.Module) -> int:
        return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())

    def _top_calls(self) -> list[int]:
        return [c.idx for c in self.tr.calls if c.name != "" and self.top_call(c.idx) == c.idx]

    def _image_arg(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        img = self.image_labels()
        out = []
        for a, lab in self.arg_labels.get(i, {}).items():
            if lab and lab <= img:
                out.append((a, self.tr.calls[i].inputs[a]))
        return out

    def _is_network(self, m: nn.Module) -> bool:
        return sum(1 for x in m.modules() if isinstance(x, _CHANNEL_TYPES)) >= 2

    def _reencoder(self) -> None:
        """The denoiser's image input, if made from the image input by other components only."""
        tr = self.tr
        cands = [i for i in self._top_calls() if i in self.live_calls and i not in self.removed_calls
                 and self._image_arg(i) and self._is_network(self.modules[tr.calls[i].name])]
        if not cands:
            return
        den = max(cands, key=lambda i: self._params(self.modules[tr.calls[i].name]))
        den_name = tr.calls[den].name
        self.denoiser = den_name
        den_comp = self.component_of(den_name)
        for arg, uids in self._image_arg(den):
            ops: set[int] = set()
            stack, seen = list(uids), set()
            while stack:
                u = stack.pop()
                if u in seen:
                    continue
                seen.add(u)
                for j in tr.producers.get(u, []):
                    if j not in ops:
                        ops.add(j)
                        stack.extend(tr.op_ins[j])
            region: list[int] = []
            for j in sorted(ops):
                t = self.top_call(tr.op_call[j])
                if t is not None and t not in region:
                    region.append(t)
            region, side = self._exclusive(region, den, set(uids))
            if not region:
                continue
            mods = [tr.calls[i].name for i in region]
            if any(self.component_of(n) == den_comp for n in mods):
                continue
            if any(not (self.arg_labels.get(i, {}) and all(v <= self.image_labels() for v in self.arg_labels[i].values()))
                   for i in region):
                continue
            if not any(self._params(self.modules[n]) for n in mods):
                continue
            src = [u for u in seen if u in tr.input_labels and tr.input_labels[u] & self.image_labels()]
            x_shape = tr.shapes.get(src[0]) if src else None
            a_shape = tr.shapes.get(uids[0])
            repl = self._replacement(x_shape, a_shape, den_name, arg)
            extra = self._outside_uses(region, den)
            names = list(dict.fromkeys(mods))
            reason = (f"re-encodes the input: {', '.join(sorted(self.image_labels()))} {tuple(x_shape) if x_shape else ''} -> "
                      f"{den_name}.{arg} {tuple(a_shape) if a_shape else ''} with nothing else feeding in; {repl}")
            if extra:
                reason += f"; its output is also used by {extra} (drop that path too, as AdcSR does)"
            if side:
                reason += (f"; it also reads {', '.join(tr.calls[i].name for i in side)}, which stay(s) for their "
                           f"other uses (the replacement simply no longer reads them)")
            for n in names:
                if n not in self.verdict:
                    self.verdict[n] = ("removable", reason)
            self.reencoder_info = {"modules": names, "into": f"{den_name}.{arg}", "input_shape": x_shape,
                                   "output_shape": a_shape, "replacement": repl, "also_used_by": extra}
            return

    def _exclusive(self, region: list[int], den: int, arg_uids: set[int]) -> tuple[list[int], list[int]]:
        """Split the region into calls used only to make the denoiser's input, and shared ones.

        A call is exclusive when everything its outputs reach (through pipeline-level glue) is
        another exclusive region call or the denoiser's image argument. S3Diff's degradation
        estimator feeds the VAE encoder's LoRA *and* the UNet's: it is shared, not a re-encoder.
        """
        tr = self.tr
        keep = list(region)
        changed = True
        while changed:
            changed = False
            for r in list(keep):
                stack, seen, ok = list(tr.calls[r].outputs), set(), True
                while stack and ok:
                    u = stack.pop()
                    if u in seen:
                        continue
                    seen.add(u)
                    if u in arg_uids:
                        continue
                    for j in tr.consumers.get(u, []):
                        c = tr.op_call[j]
                        if self.inside(c, r):
                            continue
                        t = self.top_call(c)
                        if t is None:
                            stack.extend(tr.op_outs[j])  # pipeline-level glue: follow it
                        elif t not in keep or t == den:
                            ok = False
                            break
                if not ok:
                    keep.remove(r)
                    changed = True
        return keep, [r for r in region if r not in keep]

    def _replacement(self, x, a, den: str, arg: str) -> str:
        if not x or not a or len(x) != 4 or len(a) != 4:
            return "replaceable by a cheap stem"
        if x[2] % a[2] == 0 and x[2] // a[2] >= 1 and x[3] // a[3] == x[2] // a[2]:
            r = x[2] // a[2]
            cin = x[1] * r * r
            return (f"replaceable by PixelUnshuffle({r}) ({x[1]}x{x[2]}x{x[3]} -> {cin}x{a[2]}x{a[3]}) + a conv "
                    f"{cin}->{a[1]}, or by widening {den}.conv_in to {cin} input channels (AdcSR)"
                    if r > 1 else f"replaceable by a conv {x[1]}->{a[1]} at the same resolution")
        return f"replaceable by a resize + conv {x[1]}->{a[1]}"

    def _outside_uses(self, region: list[int], den: int) -> str:
        tr = self.tr
        names: list[str] = []
        for i in region:
            for u in tr.calls[i].outputs:
                stack, seen = [u], set()
                while stack:
                    v = stack.pop()
                    if v in seen:
                        continue
                    seen.add(v)
                    for j in tr.consumers.get(v, []):
                        c = tr.op_call[j]
                        t = self.top_call(c)
                        if self.inside(c, den) or (t is not None and t in region) or j not in self.live_ops:
                            continue
                        if t is None:  # glue at the pipeline level: follow it
                            if tr.op_names[j] in ("__mul__", "mul", "__truediv__", "div", "__getitem__", "to",
                                                  "sample", "mode", "chunk", "contiguous", "clone"):
                                stack.extend(tr.op_outs[j])
                                continue
                            desc = f"the pipeline's `{tr.op_names[j]}` outside {tr.calls[den].name}"
                        else:
                            desc = tr.calls[t].name
                        if desc not in names:
                            names.append(desc)
        return ", ".join(names)

    # ------------------------------------------------------------------ foldable
    def _foldable(self) -> None:
        tr = self.tr
        for name, idxs in self.calls_of.items():
            if name == "" or name in self.verdict:
                continue
            if not all(all(self.kinds(v) <= {CONSTANT} for v in self.arg_labels.get(i, {}).values()) for i in idxs):
                continue
            # outputs too: a layer can read a variable tensor that is not an argument (S3Diff's LoRA
            # reads degradation matrices set by hooks)
            if not all(self.kinds(self.cut.get(u, frozenset())) <= {CONSTANT} for i in idxs for u in tr.calls[i].outputs):
                continue
            if not any(i in self.live_calls for i in idxs):
                continue
            anc = name.rsplit(".", 1)[0] if "." in name else ""
            while anc and anc not in self.calls_of:
                anc = anc.rsplit(".", 1)[0] if "." in anc else ""
            self.verdict[name] = ("foldable", self._fold_reason(name, idxs))
        # descendants of a foldable module are folded with it
        for name in list(self.verdict):
            if self.verdict[name][0] != "foldable":
                continue
            for other in self.calls_of:
                if other.startswith(name + ".") and self.verdict.get(other, ("",))[0] == "foldable":
                    self.verdict[other] = ("foldable", f"inside {name}, constant: folded with it")

    def _producer_module(self, u: int) -> str | None:
        best, best_d = None, -1
        for j in self.tr.producers.get(u, []):
            for c in self.tr.ancestors(self.tr.op_call[j]):
                if u in self.tr.calls[c].outputs and self.depth[c] > best_d:
                    best, best_d = self.tr.calls[c].name, self.depth[c]
        return best

    def _fold_reason(self, name: str, idxs: list[int]) -> str:
        """Where the constant meets the image path: fold target (a bias) or a cached constant."""
        tr = self.tr
        const = sorted({lab for i in idxs for v in self.arg_labels.get(i, {}).values() for lab in v})
        fixed = ", ".join(f"{k}={v}" for k, v in self.facts.constant.items())
        consts = ", ".join(f"{k}={self.facts.constant[k]}" if k in self.facts.constant else
                           ("the fixed prompt" if k == PROMPT else k) for k in const) or \
            f"no pipeline input: parameters and values the pipeline fixes{' (' + fixed + ')' if fixed else ''}"
        targets: list[str] = []
        feeds: list[str] = []
        for i in idxs:
            stack, seen = list(tr.calls[i].outputs), set()
            while stack:
                u = stack.pop()
                if u in seen:
                    continue
                seen.add(u)
                for j in tr.consumers.get(u, []):
                    if self.inside(tr.op_call[j], i) or j not in self.live_ops:
                        continue
                    ins_lab = [self.cut.get(v, frozenset()) for v in tr.op_ins[j]]
                    if all(self.kinds(lab) <= {CONSTANT} for lab in ins_lab):
                        owner = self._unit_call(tr.op_call[j], stop=i)
                        if owner is not None and tr.calls[owner].name != name:
                            if tr.calls[owner].name not in feeds:
                                feeds.append(tr.calls[owner].name)
                            continue
                        stack.extend(tr.op_outs[j])
                        continue
                    other = [v for v in tr.op_ins[j] if VARIABLE in self.kinds(self.cut.get(v, frozenset()))]
                    prod = self._producer_module(other[0]) if other else None
                    if tr.op_names[j] in _ADD_OPS and prod and hasattr(self.modules.get(prod), "bias") \
                            or (prod and self._tuner is not None and isinstance(self.modules.get(prod), self._tuner)):
                        t = f"the bias of {prod} (exact: its output is added right after it)"
                    else:
                        where = tr.calls[tr.op_call[j]].name if tr.op_call[j] is not None else "the pipeline"
                        t = f"a constant buffer read by `{tr.op_names[j]}` in {where or 'the pipeline'}"
                    if t not in targets:
                        targets.append(t)
        base = f"depends only on constants ({consts})"
        if targets:
            shown = "; ".join(targets[:2]) + (f"; +{len(targets) - 2} more" if len(targets) > 2 else "")
            return (f"{base}: fold = precompute once into {shown}; delete = drop it (AdcSR), "
                    f"changes the function, recovered by distillation")
        if feeds:
            return f"{base}; only feeds constant modules ({', '.join(feeds[:3])}{' ...' if len(feeds) > 3 else ''}): folded with them, or deleted with them (AdcSR)"
        return f"{base}: precompute once (fold), or delete (AdcSR)"

    def _unit_call(self, call: int | None, stop: int | None = None) -> int | None:
        """The outermost module call below the pipeline that is classified on its own (not glue)."""
        chain = self.tr.ancestors(call)
        for c in reversed(chain):
            name = self.tr.calls[c].name
            if name == "" or c == stop:
                continue
            if self.verdict.get(name, ("",))[0] == "foldable" or self.is_unit(self.modules[name]):
                return c
        return None

    # ------------------------------------------------------------------ pruning scopes
    def _scopes(self) -> None:
        tr = self.tr
        if self.facts.prune_scopes is not None:
            unknown = [s for s in self.facts.prune_scopes if s not in self.calls_of]
            if unknown:
                raise AdcError(f"prune_scopes: {unknown} not called in the pipeline's forward")
            self.scopes = list(self.facts.prune_scopes)
        else:
            path_mods = set(self.facts.prompt_sources) | set(self.facts.prompt_encoders)
            for i in self._top_calls():
                name = tr.calls[i].name
                if name in self.scopes or name in self.verdict or name in path_mods:
                    continue
                if i in self.live_calls and self._is_network(self.modules[name]) and \
                        any(lab & self.image_labels() for lab in self.arg_labels.get(i, {}).values()):
                    self.scopes.append(name)
        for name in getattr(self, "extra_scopes", []):
            self._check_extra_scope(name)
            self.scopes.append(name)
        for s in self.scopes:
            self._interfaces(s)

    def _check_extra_scope(self, name: str) -> None:
        """A recipe's ``prune`` override: a live network on the image path that no scope covers."""
        if name not in self.modules:
            raise AdcError(f"analyse.prune: {name!r} is not a module of the pipeline")
        if name in self.scopes or any(name.startswith(s + ".") for s in self.scopes):
            raise AdcError(f"analyse.prune: {name!r} is already pruned (in scope "
                           f"{next(s for s in self.scopes if name == s or name.startswith(s + '.'))!r})")
        verdict = self.verdict.get(name)
        if verdict is not None and verdict[0] in ("removable", "foldable"):
            raise AdcError(f"analyse.prune: {name!r} is {verdict[0]} ({verdict[1][:120]}); it cannot be pruned")
        if not self.calls_of.get(name) or not any(i in self.live_calls for i in self.calls_of[name]):
            raise AdcError(f"analyse.prune: {name!r} is not called on the way to the pipeline output")
        if not self._is_network(self.modules[name]):
            raise AdcError(f"analyse.prune: {name!r} has fewer than two convolution/linear layers; "
                           "nothing to prune between interfaces")

    def _unit_below(self, call: int | None, scope_call: int) -> int | None:
        """Innermost-first search for a layer call between an op and the scope call."""
        for c in self.tr.ancestors(call):
            if c == scope_call:
                return None
            if self.is_unit(self.modules[self.tr.calls[c].name]):
                # a LoRA wrapper's base layer belongs to the wrapper
                outer = self._tuner_ancestor(c, scope_call)
                return outer if outer is not None else c
        return None

    def _tuner_ancestor(self, c: int, stop: int) -> int | None:
        if self._tuner is None:
            return None
        found = None
        for a in self.tr.ancestors(self.tr.calls[c].parent):
            if a == stop:
                break
            if isinstance(self.modules[self.tr.calls[a].name], self._tuner):
                found = a
        return found

    def _interfaces(self, scope: str) -> None:
        """Layers of ``scope`` that touch its inputs or outputs with no layer in between."""
        tr = self.tr
        sc = self.calls_of[scope][0]
        call = tr.calls[sc]
        # input side: forward from each input through parameter-free ops
        for arg, uids in call.inputs.items():
            stack, seen = list(uids), set()
            while stack:
                u = stack.pop()
                if u in seen:
                    continue
                seen.add(u)
                for j in tr.consumers.get(u, []):
                    if not self.inside(tr.op_call[j], sc) or self._removed_op(j):
                        continue
                    unit = self._unit_below(tr.op_call[j], sc)
                    if unit is None:
                        stack.extend(tr.op_outs[j])
                        continue
                    name = tr.calls[unit].name
                    mod = self.modules[name]
                    if name in self.verdict or not self._channel_layer(mod):
                        continue
                    width = self._in_width(mod)
                    self.interfaces.setdefault(name, f"input interface: reads {scope}'s `{arg}` "
                                               f"({self._shape(u)}) directly, so its {width} input channels are fixed by the pipeline")
        # output side: backward from the outputs through parameter-free ops
        stack, seen = list(call.outputs), set()
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            for j in tr.producers.get(u, []):
                if not self.inside(tr.op_call[j], sc):
                    continue
                unit = self._unit_below(tr.op_call[j], sc)
                if unit is None:
                    stack.extend(tr.op_ins[j])
                    continue
                name = tr.calls[unit].name
                mod = self.modules[name]
                if name in self.verdict or not self._channel_layer(mod):
                    continue
                self.interfaces.setdefault(name, f"output interface: produces {scope}'s output ({self._shape(u)}), "
                                           f"so its {self._out_width(mod)} output channels are fixed by the pipeline")

    def _shape(self, u: int) -> str:
        s = self.tr.shapes.get(u)
        return "x".join(str(d) for d in s) if s else "?"

    def _base(self, m: nn.Module) -> nn.Module:
        return m.get_base_layer() if self._tuner is not None and isinstance(m, self._tuner) else m

    def _channel_layer(self, m: nn.Module) -> bool:
        return isinstance(self._base(m), _CHANNEL_TYPES)

    def _in_width(self, m: nn.Module) -> int:
        b = self._base(m)
        return getattr(b, "in_channels", getattr(b, "in_features", 0))

    def _out_width(self, m: nn.Module) -> int:
        b = self._base(m)
        return getattr(b, "out_channels", getattr(b, "out_features", 0))

    def prune(self, inputs: dict[str, Any], min_side: int) -> tuple[list[PrunableGroup], list[dict]]:
        """torch-pruning groups of every scope, each traced in a run of the pipeline at reduced resolution."""
        groups: list[PrunableGroup] = []
        builds: list[dict] = []
        graphs: dict[str, Any] = {}
        for scope in self.scopes:
            call = self.tr.calls[self.calls_of[scope][0]]
            factor = 0
            for u in call.input_uids:
                shape = self.tr.shapes.get(u, ())
                if len(shape) == 4:
                    rh, _ = reduce_spatial(shape[2], shape[3], min_side)
                    factor = shape[2] // rh if factor == 0 else min(factor, shape[2] // rh)
            small = reduced_inputs(inputs, max(factor, 1))
            module = self.modules[scope]
            outs = [self._base(self.modules[n]) for n, r in self.interfaces.items()
                    if r.startswith("output") and (n == scope or n.startswith(scope + "."))]
            runs = []
            if call.example is not None:
                a, k = reduced_example(call.example, min_side, _device_of(module))
                runs.append(lambda a=a, k=k, m=module: m(*a, **k))
            runs.append(lambda small=small: self.bundle(**small))
            skip = {id(self._base(self.modules[n])) for n in self.calls_of
                    if (n == scope or n.startswith(scope + ".")) and self._internal(n)}
            grad = {a for a, labs in self.arg_labels.get(call.idx, {}).items() if VARIABLE in self.kinds(labs)}
            gs, info, graphs[scope] = dependency_groups(module, scope, runs, self.names, ignored=outs,
                                                        start_id=len(groups), probe=self.probe, skip_roots=skip,
                                                        grad_inputs=grad or None)
            info["pipeline_inputs"] = ", ".join(f"{k} {tuple(v.shape)}" for k, v in small.items()
                                                if isinstance(v, torch.Tensor))
            groups.extend(gs)
            builds.append(info)
        return groups, builds, graphs

    def _internal(self, name: str) -> bool:
        """A removable/foldable layer whose outputs stay inside removed or folded modules."""
        v = self.verdict.get(name, ("",))[0]
        if v not in ("removable", "foldable") and not self._inherits(name):
            return False
        tr = self.tr
        for i in self.calls_of.get(name, []):
            for u in tr.calls[i].outputs:
                for j in tr.consumers.get(u, []):
                    c = tr.op_call[j]
                    if self.inside(c, i):
                        continue
                    chain = [tr.calls[a].name for a in tr.ancestors(c)]
                    if not any(n != name and (self.verdict.get(n, ("",))[0] in ("removable", "foldable")) for n in chain):
                        return False
        return True

    def _inherits(self, name: str) -> bool:
        parts = name.split(".")
        return any(self.verdict.get(".".join(parts[:k]), ("",))[0] in ("removable", "foldable")
                   for k in range(1, len(parts)))

    # ------------------------------------------------------------------ rows
    def rows(self, groups: list[PrunableGroup]) -> list[Row]:
        in_groups: dict[str, list[int]] = defaultdict(list)
        for g in groups:
            for layer in g.layers:
                if not layer.name.endswith("[lora]") and g.id not in in_groups[layer.name]:
                    in_groups[layer.name].append(g.id)
        by_id = {g.id: g for g in groups}
        macs = {k: v["total"] for k, v in self.report.by_module.items()}
        # Which components are expanded down to their layers?
        deep_roots = set(self.scopes) | set(self.reencoder_info.get("modules", []))
        deep_comps = {self.component_of(n) for n in deep_roots}

        def has_params(m: nn.Module) -> bool:
            return any(True for _ in m.parameters())

        def depends(name: str) -> str:
            labs: set = set()
            for i in self.calls_of.get(name, []):
                for v in self.arg_labels.get(i, {}).values():
                    labs |= v
            if self.calls_of.get(name):
                return self.labels_str(labs)
            return "(container)" if self._ran(name) else "(not called)"

        # emit rows in module order
        emitted: list[tuple[str, nn.Module, bool]] = []  # (name, module, collapsed)
        emitted_set: set[str] = set()
        comp_roots = {p for ps in self.comp_paths.values() for p in ps}

        def visit(name: str, m: nn.Module, comp: str, expand: bool) -> None:
            unit = self.is_unit(m)
            collapsed = unit or not expand
            emitted.append((name, m, collapsed))
            if collapsed:
                return
            for cn, child in m.named_children():
                full = f"{name}.{cn}" if name else cn
                if self.names.get(id(child)) != full:
                    continue  # an alias of a module listed elsewhere
                if has_params(child) and isinstance(child, (nn.ModuleList, nn.ModuleDict)) and not self.calls_of.get(full):
                    for gn, grandchild in child.named_children():  # containers are never called: list their items
                        gfull = f"{full}.{gn}"
                        if self.names.get(id(grandchild)) == gfull and has_params(grandchild):
                            visit(gfull, grandchild, comp, expand)
                elif has_params(child):
                    visit(full, child, comp, expand)
                elif self.verdict.get(full, ("",))[0] in ("removable", "foldable") and name in comp_roots:
                    emitted.append((full, child, True))

        for comp, paths in self.comp_paths.items():
            for path in paths:
                m = self.modules.get(path)
                if m is None or path in emitted_set:
                    continue
                emitted_set.add(path)
                if comp in deep_comps:
                    visit(path, m, comp, True)
                elif not self.calls_of.get(path) or self.is_unit(m):
                    emitted.append((path, m, True))  # not run (or one layer): one row
                else:
                    emitted.append((path, m, False))
                    for cn, child in m.named_children():
                        full = f"{path}.{cn}"
                        if self.names.get(id(child)) == full and has_params(child):
                            emitted.append((full, child, True))  # one row per child, collapsed
        # parameters of the pipeline root itself
        # accounting: each parameter once, to the deepest row that owns it
        row_names = [n for n, _, _ in emitted]
        row_set = set(row_names)
        owner: dict[int, str] = {}
        for pname, p in self.bundle.named_parameters(remove_duplicate=False):
            if id(p) in owner:
                continue
            parts = pname.split(".")[:-1]
            while parts and ".".join(parts) not in row_set:
                parts = parts[:-1]
            owner[id(p)] = ".".join(parts) if parts else ""
        own_params: dict[str, int] = defaultdict(int)
        seen: set[int] = set()
        for pname, p in self.bundle.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            own_params[owner[id(p)]] += p.numel()

        parent_row: dict[str, str | None] = {}
        for n in row_names:
            parts = n.split(".")[:-1]
            while parts and ".".join(parts) not in row_set:
                parts = parts[:-1]
            parent_row[n] = ".".join(parts) if parts else None
        children: dict[str, list[str]] = defaultdict(list)
        for n, par in parent_row.items():
            if par is not None:
                children[par].append(n)

        rows: list[Row] = []
        verdicts = self._row_verdicts(emitted, children, in_groups, by_id)
        for name, m, collapsed in emitted:
            cls_, reason = verdicts[name]
            sub = self._params(m)
            own_m = macs.get(name, 0) - sum(macs.get(c, 0) for c in children.get(name, []))
            gids = in_groups.get(name, [])
            cls_name = ("lora." if type(m).__module__.startswith("peft") else "") + type(m).__name__
            rows.append(Row(module=name, component=self.component_of(name), cls=cls_name,
                            depth=name.count(".") + 1, params=sub, own_params=own_params.get(name, 0),
                            macs=macs.get(name, 0), own_macs=max(own_m, 0), classification=cls_, reason=reason,
                            depends_on=depends(name), calls=len(self.calls_of.get(name, [])),
                            groups=" ".join(str(g) for g in gids), leaf=collapsed))
        root_p = own_params.get("", 0)
        if root_p:
            self.notes.append(f"{root_p} parameters belong to the pipeline module itself (not in any component)")
        for g in groups:
            for layer in g.layers:
                base = layer.name.replace(" [lora]", "")
                layer.role = "lora" if layer.name.endswith("[lora]") else verdicts.get(base, ("?",))[0]
            roles = {layer.role for layer in g.layers if layer.role != "lora"}
            if roles and roles <= {"removable"}:
                g.tags.append("removed")
                g.notes.append("all its layers are removable: the group disappears")
            elif roles and roles <= {"foldable"}:
                g.tags.append("constant-path")
                g.notes.append("all its layers are foldable: the group disappears once folded")
            elif "removable" in roles or "foldable" in roles:
                g.notes.append("some layers are removable/foldable (marked): prune the rest")
        return rows

    def _row_verdicts(self, emitted, children, in_groups, by_id) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        for name, m, collapsed in emitted:
            scope = next((s for s in self.scopes if name == s or name.startswith(s + ".")), None)
            # inherited verdicts (removable / foldable ancestors)
            inherited = None
            parts = name.split(".")
            for k in range(len(parts) - 1, 0, -1):
                anc = ".".join(parts[:k])
                if anc in self.verdict and self.verdict[anc][0] in ("removable", "foldable"):
                    inherited = (self.verdict[anc][0], f"inside {anc} ({self.verdict[anc][0]})")
                    break
            if name in self.verdict:
                out[name] = self.verdict[name]
            elif inherited is not None:
                out[name] = inherited
            elif not self._ran(name):
                out[name] = self._uncalled(name)
            elif name in self.interfaces:
                gids = in_groups.get(name, [])
                extra = f"; its other side is in group(s) {', '.join(map(str, gids))}" if gids else ""
                out[name] = ("keep", self.interfaces[name] + extra)
            elif scope is not None and collapsed:
                gids = in_groups.get(name, [])
                if not self.pruned:
                    out[name] = ("prunable", f"in the pruning scope {scope} (channel groups not computed: prune=False)")
                elif gids:
                    desc = "; ".join(f"#{g} ({by_id[g].channels} ch{', ' + ', '.join(by_id[g].tags) if by_id[g].tags else ''})"
                                     for g in gids[:3]) + (" ..." if len(gids) > 3 else "")
                    out[name] = ("prunable", f"channels in torch-pruning group(s) {desc}")
                else:
                    out[name] = ("keep", "in a pruning scope but in no prunable channel group")
            elif collapsed:
                out[name] = ("keep", self._keep_reason(name))
            else:
                out[name] = ("", "")  # aggregated below
        # aggregate non-leaf rows from their leaf rows, bottom-up
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        params: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for name, m, collapsed in reversed(emitted):
            if collapsed:
                counts[name][out[name][0]] += 1
                params[name][out[name][0]] += self._params(m)
            else:
                for ch in children.get(name, []):
                    for k, v in counts[ch].items():
                        counts[name][k] += v
                    for k, v in params[ch].items():
                        params[name][k] += v
            if out[name][0]:
                continue
            cn, pn = counts[name], params[name]
            if not cn:
                out[name] = ("keep", self._keep_reason(name))
                continue
            cls_ = "prunable" if "prunable" in cn else max(cn, key=lambda k: pn[k])
            parts = ", ".join(f"{cn[k]} {k}" for k in CLASSES if k in cn)
            if set(cn) == {"keep"} and not any(n.startswith(name + ".") or n == name for n in self.scopes):
                out[name] = ("keep", self._keep_reason(name))
            else:
                out[name] = (cls_, f"contains {parts} layers")
        return out

    def _uncalled(self, name: str) -> tuple[str, str]:
        """A module never called: removable, unless the forward reads its parameters directly."""
        tr = self.tr
        if "_param_readers" not in self.__dict__:
            readers: dict[str, list[int]] = defaultdict(list)
            for j in self.live_ops:
                for u in tr.op_ins[j]:
                    pname = tr.param_uids.get(u)
                    if pname is not None:
                        readers[pname.rsplit(".", 1)[0]].append(j)
            self._param_readers = readers
        ops = [j for mod, js in self._param_readers.items() if mod == name or mod.startswith(name + ".") for j in js]
        if not ops:
            return ("removable", "never called in this task's forward, and its parameters are not read")
        users = []
        for j in ops:
            c = self._unit_call(tr.op_call[j]) or tr.op_call[j]
            nm = tr.calls[c].name if c is not None else "the pipeline"
            if nm not in users:
                users.append(nm)
        verdicts = {self.verdict.get(u, ("",))[0] for u in users}
        what = f"not called, but {', '.join(users[:3])} read(s) its parameters directly"
        if verdicts == {"foldable"}:
            return ("foldable", f"{what}; they are constant, so it is folded with them")
        if verdicts == {"removable"}:
            return ("removable", f"{what}; they are removed")
        return ("keep", what)

    def _ran(self, name: str) -> bool:
        """Was the module, or anything inside it, called? (containers like ModuleList never are.)"""
        if "_ran_set" not in self.__dict__:
            ran: set[str] = set()
            for n in self.calls_of:
                parts = n.split(".")
                for k in range(1, len(parts) + 1):
                    ran.add(".".join(parts[:k]))
            self._ran_set = ran
        return name in self._ran_set

    def _keep_reason(self, name: str) -> str:
        comp = self.component_of(name)
        if comp in self.facts.prompt_sources or name in self.facts.prompt_sources:
            return "computes the per-image (variable) prompt; outside the pruning scopes"
        if comp in self.facts.prompt_encoders or name in self.facts.prompt_encoders:
            return "encodes the per-image (variable) prompt; outside the pruning scopes"
        scopes = ", ".join(self.scopes) or "none"
        m = self.modules.get(name)
        if m is not None and self.is_unit(m) and self._channel_layer(m):
            return (f"a single layer between components ({self._in_width(m)}->{self._out_width(m)} channels, "
                    f"both fixed by its neighbours); outside the pruning scopes ({scopes})")
        return f"live and needed; outside the pruning scopes ({scopes})"
