"""Dataflow trace: which pipeline inputs every module's inputs and outputs depend on.

Approach, and why: a ``TorchFunctionMode`` sees every torch call the Python code makes
(``F.conv2d``, ``torch.cat``, ``x[:, None]``, ``x.add_``), whatever the model's code looks like,
and works on ``meta`` tensors, so a 1.77 B-parameter pipeline is traced in seconds without
memory. Each tensor gets a label set (the named pipeline inputs it depends on): an op's
outputs get the union of its inputs' labels; parameters, buffers and freshly created tensors
(``torch.arange``, ``torch.tensor(999)``) carry none, i.e. they are constant. Forward pre/post
hooks on every module record, per call, the labels of each argument and of the outputs, plus
the op graph (tensor ids in and out of every op, and the module call it ran in), which the
classifier walks backwards (what reaches the output?) and forwards (where does a constant
meet a variable?). Steps that leave tensors (tags -> tokenizer -> ids) are bridged by declared
edges (:class:`~compress.analysis.facts.TaskFacts`).

A ``TorchDispatchMode`` would see aten ops after autograd and decompositions; it is not
needed here (we want dependencies, not op counts) and would miss nothing relevant.
Known blind spot: writing in place into a *view* does not relabel its base tensor.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .facts import PROMPT, TaskFacts

Labels = frozenset

_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ior__", "__iand__"}


@dataclass
class Call:
    """One call of a module: the labels of each argument and of the outputs, in call order."""

    idx: int
    name: str
    parent: int | None
    inputs: dict[str, tuple[int, ...]]  # argument name -> tensor uids
    outputs: tuple[int, ...] = ()
    out_labels: frozenset = frozenset()  # union over outputs (or declared, for non-tensor outputs)
    added: frozenset = frozenset()  # labels given to every tensor input (prompt encoders, declared edges)
    prompt_source: bool = False  # outputs relabelled as the prompt
    example: tuple[tuple, dict] | None = None  # (args, kwargs) kept for top-level calls only

    @property
    def input_uids(self) -> tuple[int, ...]:
        return tuple(u for us in self.inputs.values() for u in us)


@dataclass
class Trace:
    """Result of :func:`trace`: calls, the op graph, and per-tensor labels and shapes."""

    calls: list[Call]
    op_names: list[str]
    op_ins: list[tuple[int, ...]]
    op_outs: list[tuple[int, ...]]
    op_call: list[int | None]
    labels: dict[int, frozenset]
    shapes: dict[int, tuple[int, ...]]
    input_uids: dict[str, tuple[int, ...]]
    input_labels: dict[int, frozenset]  # labels given to the pipeline inputs
    output_uids: tuple[int, ...]
    events: list[tuple[str, int]]  # ("start", call) / ("op", op) / ("end", call), in execution order
    param_uids: dict[int, str]  # tensor id -> parameter name, for parameters the forward read
    producers: dict[int, list[int]] = field(default_factory=dict)
    consumers: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, (ins, outs) in enumerate(zip(self.op_ins, self.op_outs)):
            for u in outs:
                self.producers.setdefault(u, []).append(i)
            for u in ins:
                self.consumers.setdefault(u, []).append(i)

    def ancestors(self, call: int | None) -> list[int]:
        """``call`` and its enclosing calls, innermost first."""
        chain = []
        while call is not None:
            chain.append(call)
            call = self.calls[call].parent
        return chain


class _Tracer(TorchFunctionMode):
    """Labels tensors and records the op graph; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self._ids: dict[int, tuple[weakref.ref, int]] = {}
        self._next = 0
        self.labels: dict[int, frozenset] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.op_names: list[str] = []
        self.op_ins: list[tuple[int, ...]] = []
        self.op_outs: list[tuple[int, ...]] = []
        self.op_call: list[int | None] = []
        self.stack: list[int] = []
        self.events: list[tuple[str, int]] = []
        self.param_names: dict[int, str] = {}  # id of each parameter as the forward sees it -> name
        self.param_uids: dict[int, str] = {}

    def uid(self, t: torch.Tensor) -> int:
        entry = self._ids.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        u = self._next
        self._next += 1
        self._ids[id(t)] = (weakref.ref(t), u)
        self.shapes[u] = tuple(t.shape)
        name = self.param_names.get(id(t))
        if name is not None:
            self.param_uids[u] = name
        return u

    def uids(self, x: Any) -> tuple[int, ...]:
        return tuple(self.uid(t) for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor))

    def add_labels(self, uids, labels: frozenset) -> None:
        if labels:
            for u in uids:
                self.labels[u] = self.labels.get(u, frozenset()) | labels

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", None) or str(func)
        if name == "__get__":  # attribute reads (x.shape, x.device): no dataflow
            return out
        ins = self.uids((args, kwargs))
        outs = self.uids(out)
        if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__")):
            outs = outs + ins[:1]
        if "out" in kwargs and isinstance(kwargs["out"], torch.Tensor):
            outs = outs + (self.uid(kwargs["out"]),)
        if not outs:
            return out
        lab = frozenset().union(*(self.labels.get(u, frozenset()) for u in ins)) if ins else frozenset()
        self.add_labels(outs, lab)
        self.op_names.append(name)
        self.op_ins.append(ins)
        self.op_outs.append(outs)
        self.op_call.append(self.stack[-1] if self.stack else None)
        self.events.append(("op", len(self.op_names) - 1))
        return out


def _arg_names(module: nn.Module, args: tuple, kwargs: dict, cache: dict) -> list[tuple[str, Any]]:
    """(argument name, value) pairs, positional arguments named from ``forward``'s signature."""
    key = type(module)
    if key not in cache:
        try:
            params = [p for p in inspect.signature(module.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            cache[key] = [p.name for p in params]
        except (TypeError, ValueError):
            cache[key] = []
    names = cache[key]
    pairs = [(names[i] if i < len(names) else f"args[{i}]", a) for i, a in enumerate(args)]
    return pairs + list(kwargs.items())


def _hooked(bundle: nn.Module) -> list[nn.Module]:
    """Modules worth a call record: all but parameter-free leaves (activations, dropout) below the
    second level; those add nothing the classifier uses and cost two hook handles each."""
    out = []
    for name, m in bundle.named_modules():
        if name.count(".") >= 2 and not any(True for _ in m.children()) and not any(True for _ in m.parameters()):
            continue
        out.append(m)
    return out


def trace(bundle: nn.Module, facts: TaskFacts, inputs: dict[str, Any], call_fn=None) -> Trace:
    """Run ``bundle(**inputs)`` (or ``call_fn(bundle, inputs)``) under the tracer; return the trace.

    ``inputs`` are labelled by ``facts``: names in ``facts.variable`` with their own name,
    ``facts.prompt_inputs`` with ``"prompt"``, ``facts.constant`` with their own name.
    The caller chooses the device (meta stand-ins are the default in :func:`analyse`).
    """
    tracer = _Tracer()
    names = {}
    for n, m in bundle.named_modules():
        names.setdefault(id(m), n)
    sig_cache: dict = {}
    calls: list[Call] = []
    last_out: dict[str, frozenset] = {}
    sources = set(facts.prompt_sources)
    encoders = set(facts.prompt_encoders)
    edges: dict[str, list[str]] = {}
    for src, dst in facts.edges:
        edges.setdefault(dst, []).append(src)

    def pre(module, args, kwargs):
        with torch._C.DisableTorchFunction():
            name = names.get(id(module), type(module).__name__)
            parent = tracer.stack[-1] if tracer.stack else None
            if parent is None and not tracer.param_names:
                # The tensors the forward will really read (meta stand-ins under functional_call):
                # lets the classifier see parameters read without calling their module.
                tracer.param_names = {id(p): n for n, p in bundle.named_parameters()}
            pairs = _arg_names(module, args, kwargs, sig_cache)
            call = Call(idx=len(calls), name=name, parent=parent, inputs={k: tracer.uids(v) for k, v in pairs})
            added: set = set()
            if name in encoders:
                added.add(PROMPT)
            for src in edges.get(name, ()):
                added |= last_out.get(src, frozenset())
            call.added = frozenset(added)
            tracer.add_labels(call.input_uids, call.added)
            if parent is None or calls[parent].parent is None and calls[parent].name == "":
                call.example = (args, dict(kwargs))  # top-level calls: kept to rebuild pruning inputs
            calls.append(call)
            tracer.stack.append(call.idx)
            tracer.events.append(("start", call.idx))

    def post(module, args, kwargs, output):
        with torch._C.DisableTorchFunction():
            idx = tracer.stack.pop()
            call = calls[idx]
            call.outputs = tracer.uids(output)
            tracer.events.append(("end", idx))
            if call.name in sources:
                call.prompt_source = True
                # The prompt is its own information channel: what the task does with it is the
                # prompt policy, not the labels of the image the tagger looked at.
                for u in call.outputs:
                    tracer.labels[u] = frozenset({PROMPT})
                call.out_labels = frozenset({PROMPT})
            else:
                lab: set = set()
                for u in call.outputs:
                    lab |= tracer.labels.get(u, frozenset())
                if not call.outputs:  # strings or other non-tensor output: carry the input labels
                    for us in call.inputs.values():
                        for u in us:
                            lab |= tracer.labels.get(u, frozenset())
                call.out_labels = frozenset(lab)
            last_out[call.name] = call.out_labels

    handles = []
    try:
        for m in _hooked(bundle):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        input_uids: dict[str, tuple[int, ...]] = {}
        input_labels: dict[int, frozenset] = {}
        with tracer:
            with torch._C.DisableTorchFunction():
                for k, v in inputs.items():
                    us = tracer.uids(v)
                    input_uids[k] = us
                    lab = frozenset({k}) if (k in facts.variable or k in facts.constant) else \
                        frozenset({PROMPT}) if k in facts.prompt_inputs else frozenset()
                    tracer.add_labels(us, lab)
                    for u in us:
                        input_labels[u] = input_labels.get(u, frozenset()) | lab
            out = call_fn(bundle, inputs) if call_fn is not None else bundle(**inputs)
            with torch._C.DisableTorchFunction():
                output_uids = tracer.uids(out)
    finally:
        for h in handles:
            h.remove()
    return Trace(calls=calls, op_names=tracer.op_names, op_ins=tracer.op_ins, op_outs=tracer.op_outs,
                 op_call=tracer.op_call, labels=tracer.labels, shapes=tracer.shapes,
                 input_uids=input_uids, input_labels=input_labels, output_uids=output_uids,
                 events=tracer.events, param_uids=tracer.param_uids)
