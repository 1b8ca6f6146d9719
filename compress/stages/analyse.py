"""``analyse``: classify every module of the family's teacher; the result is the run's plan.

The teacher is analysed on ``meta`` (the classification depends on the architecture and the
task facts, not on values, so no weights are needed at any size). The plan (what to remove, what
to fold at which constants, the interfaces and channel groups of each pruning scope, with their
dependency graphs) goes to ``bundle.plan`` for ``remove`` and ``prune``, and to ``plan.json``.
A recipe can override a decision: ``keep`` (patterns of modules the plan must leave as they
are) and ``prune`` (modules to prune besides the automatic scopes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdcError
from ..io import atomic_write_json
from ..config import ranged

PLAN_FILE = "plan.json"


@dataclass
class AnalyseConfig:
    groups: bool = True         # build the torch-pruning dependency groups (the prune stage reuses them)
    min_side: int = ranged(16, 1, 4096)          # latent side used to build the pruning graphs (coupling is size-free)
    keep: list[str] = field(default_factory=list)   # modules (glob patterns) the plan must keep
    prune: list[str] = field(default_factory=list)  # extra modules to prune (live networks the plan keeps)

    def validate(self, path: str) -> None:
        if self.min_side < 4:
            raise AdcError(f"{path}.min_side: expected >= 4, got {self.min_side}")


def run_analyse(bundle, config: AnalyseConfig, stage_dir: Path) -> dict[str, Any]:
    from ..analysis import analyse, write_report

    recipe, family = bundle.recipe, bundle.family
    task = recipe.task
    teacher = bundle.meta_teacher()
    facts = family.facts(task.prompt, task.timestep)
    inputs = family.example_inputs(task.lr_size, "meta", teacher)
    pipeline = family.analysis_pipeline(teacher)
    analysis = analyse(pipeline, facts, inputs, model=f"{family.name} ({bundle.size})", device="meta",
                       prune=config.groups, min_side=config.min_side, call=family.analysis_call, keep=config.keep,
                       extra_scopes=config.prune)
    spec = family.pipeline_spec()
    if pipeline is teacher and not spec.modulated_lora:  # the same calls, counted once: the profile reuses them
        from ..profile.pipeline import count_pipeline

        bundle._cache[("teacher_counts", task.lr_size)] = count_pipeline(
            spec, teacher, task.lr_size, family.name, bundle.size, task.scale, report=analysis.info["mac_report"])
    md, csv, groups = write_report(analysis, stage_dir / "analysis.md", stage_dir / "analysis.csv")
    atomic_write_json(stage_dir / PLAN_FILE, analysis.plan.to_dict())
    bundle.plan = analysis.plan
    summary = analysis.summary()
    return {"report": bundle.rel(md), "csv": bundle.rel(csv), "groups": bundle.rel(groups),
            "plan": bundle.rel(stage_dir / PLAN_FILE),
            "summary": {r["class"]: {"params": int(r["params"]), "macs": int(r["macs"])} for _, r in summary.iterrows()},
            "decisions": {a: len(analysis.plan.of(a)) for a in ("remove", "fold", "keep")},
            "device": "meta", "lr_size": task.lr_size, "counter": analysis.info["counter"]}


def load_plan(bundle):
    """The run's plan: in memory, or read back from the ``analyse`` stage's ``plan.json`` (no graphs)."""
    if bundle.plan is None and "analyse" in bundle.artifacts and "plan" in bundle.artifacts["analyse"]:
        import json

        from ..analysis.plan import Plan

        path = bundle.resolve(bundle.artifacts["analyse"]["plan"])
        try:
            bundle.plan = Plan.from_dict(json.loads(path.read_text()), str(path))
        except (OSError, ValueError) as exc:
            raise AdcError(f"{path}: unreadable analysis plan ({exc}); rerun the analyse stage") from None
    return bundle.plan
