"""The analysis as a plan that the transformations consume.

:func:`compress.analysis.analyse` classifies every module; :class:`Plan` is that result in the
form ``remove`` / ``fold`` / ``prune`` act on:

* ``decisions``: the outermost modules to remove and to fold (with the constants they fold
  at), and the modules a recipe forced to keep, each with its reason;
* ``scopes``: per pruning scope (a network on the image path, e.g. ``unet``, ``vae.decoder``)
  its interface layers (which side the pipeline fixes), the layers kept at full width, the
  prunable channel groups and the torch-pruning ``DependencyGraph`` they came from: built once
  during the analysis and handed to :func:`compress.prune.prune_channels` (rebound by name to
  the module being pruned), never traced a second time in a run;
* ``reencoder``: what maps the image input to the denoiser's input, and its replacement.

Names are pipeline paths (``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2``);
:meth:`Plan.part` gives them relative to one part (``unet``), as the part's own module sees them.
The plan is written to ``plan.json`` (without the graphs); a resumed run reads it back.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..errors import AdcError
from .groups import PrunableGroup

ACTIONS = ("remove", "fold", "keep")


@dataclass
class Decision:
    """One module and what the plan does with it."""

    module: str
    action: str  # remove | fold | keep (a recipe override of remove/fold/prune)
    reason: str
    params: int = 0


@dataclass
class ScopePlan:
    """A pruning scope: its interfaces, the layers kept whole, its groups and their dependency graph."""

    scope: str
    interfaces: dict[str, str] = field(default_factory=dict)  # layer path -> "in" | "out" (the fixed side)
    kept: list[str] = field(default_factory=list)              # layers a recipe keeps at full width
    groups: list[PrunableGroup] = field(default_factory=list)
    graph: Any = None                                          # torch_pruning.DependencyGraph (not saved)


@dataclass
class PartPlan:
    """The plan seen from one part of the pipeline (names relative to it)."""

    path: str
    remove: list[Decision]
    fold: list[Decision]
    interfaces: dict[str, str]
    kept: list[str]
    scope: ScopePlan | None

    def names(self, action: str) -> list[str]:
        return [d.module for d in (self.remove if action == "remove" else self.fold)]


@dataclass
class Plan:
    model: str
    constants: dict[str, Any]
    prompt: str
    decisions: list[Decision] = field(default_factory=list)
    scopes: dict[str, ScopePlan] = field(default_factory=dict)
    reencoder: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, list[str]] = field(default_factory=dict)

    def of(self, action: str) -> list[Decision]:
        return [d for d in self.decisions if d.action == action]

    def part(self, path: str) -> PartPlan:
        """Decisions, interfaces and scope of the part at ``path``, with names relative to it."""
        pre = path + "."

        def rel(name: str) -> str | None:
            return name[len(pre):] if name.startswith(pre) else ("" if name == path else None)

        def pick(action: str) -> list[Decision]:
            return [Decision(r, d.action, d.reason, d.params) for d in self.of(action)
                    if (r := rel(d.module)) is not None]

        scope = self.scopes.get(path)
        interfaces = {r: side for n, side in (scope.interfaces.items() if scope else []) if (r := rel(n))}
        kept = [r for n in (scope.kept if scope else []) if (r := rel(n))]
        return PartPlan(path, pick("remove"), pick("fold"), interfaces, kept, scope)

    def take_graph(self, path: str, module: nn.Module):
        """The scope's dependency graph, rebound to ``module`` (an architecturally equal copy of the
        analysed part: same names, LoRA wrappers gone, removed modules missing). Handed out once."""
        scope = self.scopes.get(path)
        if scope is None or scope.graph is None:
            return None
        from ..prune.graph import rebind_graph

        graph, scope.graph = scope.graph, None
        return rebind_graph(graph, module)

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {"format": "adc-plan", "version": 1, "model": self.model, "constants": self.constants,
                "prompt": self.prompt, "decisions": [asdict(d) for d in self.decisions],
                "scopes": {k: {"interfaces": s.interfaces, "kept": s.kept, "groups": len(s.groups)}
                           for k, s in self.scopes.items()},
                "reencoder": self.reencoder, "overrides": self.overrides}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "plan.json") -> "Plan":
        if not isinstance(d, dict) or d.get("format") != "adc-plan":
            raise AdcError(f"{where}: not an adc analysis plan")
        try:
            return cls(model=d["model"], constants=dict(d["constants"]), prompt=d["prompt"],
                       decisions=[Decision(**x) for x in d["decisions"]],
                       scopes={k: ScopePlan(k, dict(v["interfaces"]), list(v.get("kept", [])))
                               for k, v in d["scopes"].items()},
                       reencoder=dict(d.get("reencoder", {})), overrides=dict(d.get("overrides", {})))
        except (KeyError, TypeError) as exc:
            raise AdcError(f"{where}: malformed plan ({exc})") from None


def matches(name: str, patterns: list[str]) -> str | None:
    """The first glob pattern that ``name`` or one of its ancestors matches."""
    parts = name.split(".")
    for pat in patterns:
        for k in range(len(parts), 0, -1):
            if fnmatch.fnmatchcase(".".join(parts[:k]), pat):
                return pat
    return None


def build_plan(analysis, keep: list[str]) -> Plan:
    """The plan of an :class:`~compress.analysis.core.Analysis` (rows already carry the overrides)."""
    decisions: list[Decision] = []
    rows = analysis.rows
    leaves: dict[str, list[str]] = {}
    for r in rows:
        if r.leaf:
            parts = r.module.split(".")
            for k in range(1, len(parts) + 1):
                leaves.setdefault(".".join(parts[:k]), []).append(r.classification)
    taken: list[str] = []
    for r in rows:  # outermost rows whose every layer shares the class
        cls = r.classification
        if cls not in ("removable", "foldable", "keep") or any(r.module.startswith(t + ".") for t in taken):
            continue
        if cls == "keep" and not r.reason.startswith("kept by the recipe"):
            continue
        if set(leaves.get(r.module, [cls])) != {cls}:
            continue
        action = {"removable": "remove", "foldable": "fold", "keep": "keep"}[cls]
        decisions.append(Decision(r.module, action, r.reason, r.params))
        taken.append(r.module)
    scopes = {}
    for s in analysis.info.get("scopes", []):
        inter = {n: ("in" if why.startswith("input") else "out")
                 for n, why in analysis.info.get("interfaces", {}).items() if n == s or n.startswith(s + ".")}
        kept = [r.module for r in rows if r.leaf and r.classification == "keep" and r.reason.startswith("kept by the recipe")
                and r.module.startswith(s + ".")]
        scopes[s] = ScopePlan(s, inter, kept, [g for g in analysis.groups if g.scope == s],
                              analysis.info.get("graphs", {}).get(s))
    facts = analysis.facts
    return Plan(model=analysis.model, constants=dict(facts.constant), prompt=facts.prompt, decisions=decisions,
                scopes=scopes, reencoder=dict(analysis.info.get("re_encoder", {})),
                overrides={"keep": list(keep), "prune": list(analysis.info.get("extra_scopes", []))})


__all__ = ["Plan", "Decision", "ScopePlan", "PartPlan", "build_plan", "matches", "ACTIONS"]
