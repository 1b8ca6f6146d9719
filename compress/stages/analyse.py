"""``analyse``: classify every module of the teacher pipeline (see :mod:`compress.analysis`).

Full size is analysed on ``meta`` (no weights needed: the classification depends on the
architecture and the task facts, not on the values); tiny runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class AnalyseConfig:
    groups: bool = True         # list torch-pruning dependency groups (coupled layers)
    min_side: int = 16          # latent side used to build the pruning graphs (coupling is size-free)


def run_analyse_needs(bundle, config: AnalyseConfig) -> list[str]:
    return []


def run_analyse(bundle, config: AnalyseConfig, stage_dir: Path) -> dict[str, Any]:
    import torch

    from ..analysis import analyse, osediff_facts, write_report
    from ..zoo import build

    recipe = bundle.recipe
    task = recipe.task
    device = "meta" if bundle.size == "full" else "cpu"
    model = build(recipe.models.teacher, bundle.size, device)
    facts = osediff_facts(task.prompt)
    facts.constant["timestep"] = task.timestep
    lr = torch.zeros(1, 3, task.lr_size, task.lr_size, device=device)
    analysis = analyse(model, facts, {"lr": lr}, model=f"{recipe.models.teacher} ({bundle.size})",
                       device="meta" if device == "meta" else None, prune=config.groups, min_side=config.min_side)
    md, csv, groups = write_report(analysis, stage_dir / "analysis.md", stage_dir / "analysis.csv")
    summary = analysis.summary()
    return {"report": str(md), "csv": str(csv), "groups": str(groups),
            "summary": {r["class"]: {"params": int(r["params"]), "macs": int(r["macs"])} for _, r in summary.iterrows()},
            "device": device, "lr_size": task.lr_size, "counter": "torch.utils.flop_counter (MACs = FLOPs/2)"}
