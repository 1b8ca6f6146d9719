"""Params and MACs of a whole inference pipeline, per component, as it is deployed.

A family's :class:`~compress.families.PipelineSpec` says which calls one SR inference makes
(e.g. the prompt extractor's tag logits, then the forward) and how its LoRA is deployed;
:func:`count_pipeline` counts those calls with the primary counter (``FlopCounterMode`` on
``meta``: no weights, no memory) and splits params and MACs by the model's ``components()``.

* LoRA that can be folded into the base weights (a one-step model's
  plain adapters) is excluded from the MACs (as
  deployed: merged); its unmerged cost is shown in its own column.
* LoRA modulated by an input-dependent matrix (S3Diff's ``B . de_mod . A``) cannot be merged:
  its A/B matmuls and the r x r mix are counted (the counter sees the mix as activation x
  activation, i.e. attention; it is moved to the LoRA column here).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..errors import AdcError
from .counters import MacCounter, count_params

LORA_LEAF = re.compile(r"\.lora_[AB]\.[^.]+$")  # peft: <layer>.lora_A.<adapter>
LORA_A_LEAF = re.compile(r"\.lora_A\.[^.]+$")


def component_paths(model: nn.Module) -> dict[str, list[str]]:
    """Component name -> module paths in ``model`` (a ModuleDict wrapper -> its children's paths)."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    out: dict[str, list[str]] = {}
    for comp, mod in model.components().items():
        if id(mod) in names and names[id(mod)]:
            out[comp] = [names[id(mod)]]
        else:
            paths = [names.get(id(c)) for c in mod.children()]
            if not paths or any(p is None for p in paths):
                raise AdcError(f"{type(model).__name__}.components()[{comp!r}] is not made of the model's modules")
            out[comp] = paths
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class _LoraMixMacs:
    """Counts S3Diff's de_mod mix (out_r = sum_k a_k M[k, r]: numel x r MACs) at each lora_A output."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.macs: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> "_LoraMixMacs":
        for name, mod in self.model.named_modules():
            if LORA_A_LEAF.search(name):
                self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, inputs, output):
            r = output.shape[1] if output.dim() == 4 else output.shape[-1]
            self.macs[name] = self.macs.get(name, 0) + output.numel() * r

        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class ModelCounts:
    """Params and MACs of one model, per component (DataFrame indexed by component)."""

    model: str
    lr_size: int
    sr_size: int
    size: str
    table: pd.DataFrame  # params, params_lora, macs_conv_linear, macs_lora, macs_attention, macs_other, macs_total
    calls: list[str]
    counter_version: str
    dtype: str
    seconds: float

    @property
    def total(self) -> pd.Series:
        return self.table.sum(numeric_only=True)


def _lora_params(model: nn.Module, paths: list[str]) -> int:
    seen: dict[int, int] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if ".lora_" in n and any(_under(n, pre) for pre in paths):
            seen[id(p)] = p.numel()
    return sum(seen.values())


def count_pipeline(spec, model: nn.Module, lr_size: int = 128, name: str = "", size: str = "",
                   scale: int = 4, report: Any = None) -> ModelCounts:
    """Params (per component) and MACs of the whole pipeline at ``lr_size`` -> ``scale`` x ``lr_size``.

    ``spec``: a :class:`~compress.families.PipelineSpec`; ``model``: built on ``meta``.
    ``report``: a :class:`~compress.profile.counters.MacReport` of these very calls made earlier
    (the analysis counts them while it traces, with ``root=model`` and ``depth=64``): used as it is
    instead of counting again. Not for modulated LoRA, whose mix is measured while counting.
    """
    t0 = time.perf_counter()
    if report is None and any(p.device.type != "meta" for p in model.parameters()):
        raise AdcError("count_pipeline: pass a model built on meta (family.build_teacher(size, 'meta'))")
    if report is not None and spec.modulated_lora:
        raise AdcError(f"count_pipeline: {spec.title}'s modulated LoRA is measured while counting; pass no report")
    paths = component_paths(model)
    params = count_params(model, groups=paths)
    if params["unassigned"]:
        raise AdcError(f"{spec.title}: {params['unassigned']} parameters belong to no component of components()")

    lr = torch.empty(1, 3, lr_size, lr_size, device="meta")
    reports, labels = [], []
    mix = _LoraMixMacs(model) if spec.modulated_lora else None
    # device=None: the model already lives on meta; counting "on meta" as MacCounter(device='meta')
    # would also make meta every tensor code creates without a device, and some pipeline code
    # reads a host scalar (one_step_x0's .item() on the noise schedule).
    counter = MacCounter(device=None, depth=64, root=model)
    for label, fn, args in spec.calls(model, lr):
        labels.append(label)
        if report is not None:
            continue
        if mix is not None:
            with mix:
                reports.append(counter.count(fn, *args))
        else:
            reports.append(counter.count(fn, *args))
    if report is not None:
        reports = [report]

    rows = {}
    for comp, prefixes in paths.items():
        row = {"params": params["components"][comp], "params_lora": _lora_params(model, prefixes),
               "macs_conv_linear": 0, "macs_lora": 0, "macs_attention": 0, "macs_other": 0}
        for rep in reports:
            for pre in prefixes:
                d = rep.by_module.get(pre)
                if d is None:
                    continue
                row["macs_conv_linear"] += d["conv_linear"]
                row["macs_attention"] += d["attention"]
                row["macs_other"] += d["other"]
            lora_ab = sum(d["total"] for k, d in rep.by_module.items()
                          if LORA_LEAF.search(k) and any(_under(k, pre) for pre in prefixes))
            if spec.mergeable_lora:
                row["macs_conv_linear"] -= lora_ab  # deployed merged
            row["macs_lora"] += lora_ab
        if mix is not None:
            m = sum(v for k, v in mix.macs.items() if any(_under(k, pre) for pre in prefixes))
            row["macs_attention"] -= m  # the counter scores the mix as activation x activation
            row["macs_conv_linear"] += m
            row["macs_lora"] += m
            if row["macs_attention"] < 0:
                raise AdcError(f"{spec.title}: LoRA mix accounting went negative in {comp}")
        rows[comp] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    # Whatever ran outside every component (glue code; normally zero): the pipeline's totals, with
    # the same LoRA accounting, minus the components' sum.
    mixed = sum(mix.macs.values()) if mix is not None else 0
    lora_ab = sum(d["total"] for rep in reports for k, d in rep.by_module.items() if LORA_LEAF.search(k))
    totals = {"macs_conv_linear": sum(r.conv_linear for r in reports) + mixed - (lora_ab if spec.mergeable_lora else 0),
              "macs_attention": sum(r.attention for r in reports) - mixed,
              "macs_other": sum(r.other for r in reports)}
    outside = {k: int(v - table[k].sum()) for k, v in totals.items()}
    if any(outside.values()):
        table.loc["(outside components)"] = {"params": 0, "params_lora": 0, "macs_lora": 0, **outside}
    table = table.astype("int64")
    table["macs_total"] = table["macs_conv_linear"] + table["macs_attention"] + table["macs_other"]
    dtype = reports[0].dtype or "float32"
    return ModelCounts(name or spec.title, lr_size, scale * lr_size, size, table, labels, reports[0].counter_version,
                       dtype, time.perf_counter() - t0)


__all__ = ["count_pipeline", "component_paths", "ModelCounts", "LORA_LEAF", "LORA_A_LEAF"]
