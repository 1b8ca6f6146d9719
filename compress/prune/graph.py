"""Reuse one torch-pruning dependency graph for an architecturally equal module.

The analysis traces each pruning scope once (on the teacher's module, often on ``meta`` at a
reduced resolution). The module that is pruned later is another instance: the student's copy
of that part, with the same parameter names, peft's LoRA wrappers gone (``x.base_layer`` is now
``x``), and the modules the plan removed missing. :func:`rebind_graph` points every node of the
graph at the module with the same name in the new one and drops the nodes whose module is gone
(with every dependency on them), so the channel coupling that remains is exactly that of the
new module. Index mappings of concatenations and reshapes are recomputed by torch-pruning from
the current widths whenever a group is formed, so widened interface layers are fine.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import AdcError


def _plain(name: str) -> str:
    return name.replace(".base_layer", "")


def rebind_graph(dg: Any, model: nn.Module) -> Any:
    """``dg`` (a ``torch_pruning.DependencyGraph``) rebound to ``model`` in place; returns it."""
    old_names = dict(getattr(dg, "_module2name", {}))
    new_modules = dict(model.named_modules())
    keep: dict[nn.Module, Any] = {}
    dropped = []
    for module, node in dg.module2node.items():
        name = old_names.get(module)
        if name is None:  # an op node (concat, split, reshape, elementwise ...): not a module of the model
            keep[module] = node
            continue
        new = new_modules.get(_plain(name))
        if new is None or type(new) is not type(module):
            dropped.append(node)
            continue
        node.module = new
        keep[new] = node
    gone = set(map(id, dropped))
    for node in keep.values():
        node.inputs = [n for n in node.inputs if id(n) not in gone]
        node.outputs = [n for n in node.outputs if id(n) not in gone]
        node.dependencies = [d for d in node.dependencies if id(d.source) not in gone and id(d.target) not in gone]
    dg.module2node = keep
    dg.model = model
    dg._module2name = {m: n for n, m in new_modules.items()}
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in keep):
        raise AdcError(f"the analysis' dependency graph has no layer of this {type(model).__name__} "
                       "(built for another model?)")
    return dg


__all__ = ["rebind_graph"]
