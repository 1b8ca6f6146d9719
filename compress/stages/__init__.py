"""The stage registry: name -> (config class, function, what it needs).

A stage is a plain function ``fn(bundle, config, stage_dir) -> artifacts`` (a JSON-able dict);
its config class is validated when the recipe is loaded, before anything runs. Stage modules
are imported on first use, so loading a recipe stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    config_name: str
    function_name: str

    @property
    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_name)

    @property
    def fn(self) -> Callable[..., dict[str, Any]]:
        return getattr(importlib.import_module(self.module), self.function_name)

    def needs(self, bundle: Any, config: Any) -> list[str]:
        """Weights or data this stage needs that the recipe does not provide (empty = can run)."""
        check = getattr(importlib.import_module(self.module), f"{self.function_name}_needs", None)
        return list(check(bundle, config)) if check else []


def _spec(name: str, module: str, cls: str) -> StageSpec:
    return StageSpec(name, f"compress.stages.{module}", cls, f"run_{name}")


STAGES: dict[str, StageSpec] = {s.name: s for s in [
    _spec("train_teacher", "teacher", "TrainTeacherConfig"),
    _spec("analyse", "analyse", "AnalyseConfig"),
    _spec("remove", "structure", "RemoveConfig"),
    _spec("prune", "structure", "PruneConfig"),
    _spec("pretrain_decoder", "recover", "PretrainDecoderConfig"),
    _spec("distill", "recover", "DistillConfig"),
    _spec("evaluate", "evaluate", "EvaluateConfig"),
    _spec("profile", "profile", "ProfileConfig"),
    _spec("report", "report", "ReportConfig"),
]}
