"""The stage registry: name -> (config class, function, what it needs, recipe-wide checks).

A stage is a plain function ``run_<name>(bundle, config, stage_dir) -> artifacts`` (a JSON-able
dict); it reads the model family, the recipe and earlier stages' results from the bundle and
may hand on a new student (``bundle.student``). Optional companions in the same module:
``run_<name>_needs(bundle, config) -> [what is missing]`` (the stage is then skipped and the run
stops with a list of what to give) and ``check_<name>(recipe, config, path)`` (validation that
needs the whole recipe, run when the recipe is loaded). Stage modules are imported on first
use, so loading a recipe stays cheap.
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
    everyone: bool = False   # run on every process of a launch (training); else on the main one only

    def _get(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.module), attr, None)

    @property
    def config_cls(self) -> type:
        return self._get(self.config_name)

    @property
    def fn(self) -> Callable[..., dict[str, Any]]:
        return self._get(f"run_{self.name}")

    @property
    def check(self) -> Callable[..., None] | None:
        return self._get(f"check_{self.name}")

    def needs(self, bundle: Any, config: Any) -> list[str]:
        """Weights or data this stage needs that the recipe does not provide (empty = can run)."""
        check = self._get(f"run_{self.name}_needs")
        return list(check(bundle, config)) if check else []


def _spec(name: str, module: str, cls: str, everyone: bool = False) -> StageSpec:
    return StageSpec(name, f"compress.stages.{module}", cls, everyone)


STAGES: dict[str, StageSpec] = {s.name: s for s in [
    _spec("train_teacher", "teacher", "TrainTeacherConfig", everyone=True),
    _spec("analyse", "analyse", "AnalyseConfig"),
    _spec("remove", "structure", "RemoveConfig"),
    _spec("prune", "structure", "PruneConfig"),
    _spec("pretrain_decoder", "recover", "PretrainDecoderConfig", everyone=True),
    _spec("distill", "recover", "DistillConfig", everyone=True),
    _spec("evaluate", "evaluate", "EvaluateConfig"),
    _spec("profile", "profile", "ProfileConfig"),
    _spec("quantize", "quantize", "QuantizeConfig"),
    _spec("report", "report", "ReportConfig"),
]}
