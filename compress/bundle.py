"""The model bundle that stages share: the recipe, its family, the run directory, models on demand.

Nothing here is global: the runner makes one :class:`Bundle` per run and passes it to every
stage. The teacher is built (or loaded from the user's local weights) the first time a stage
asks for it; the student and the analysis plan are handed from stage to stage in memory
(``bundle.student``, ``bundle.plan``) and the runner saves the student once per stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdcError
from .recipe import Recipe


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AdcError(f"device: {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdcError(f"device: {name!r} asked for but CUDA is not available here")
    return device


@dataclass
class Bundle:
    recipe: Recipe
    run_dir: Path
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)   # stage -> what it needs and lacks
    student: Any = None          # compress.student.StudentState handed between stages
    student_changed: bool = False  # set by a stage that hands on a new student (the runner saves it)
    plan: Any = None             # compress.analysis.Plan of this run (with its dependency graphs)
    notes: list[str] = field(default_factory=list)  # visible lines for the report (what was skipped and why)
    processes: int = 1           # processes of the launch (training stages run on all of them)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- what the recipe says
    @property
    def family(self):
        return self.recipe.family

    @property
    def weights(self) -> Any:
        return self.recipe.models.weights

    @property
    def options(self) -> Any:
        return self.recipe.models.options

    @property
    def device(self) -> torch.device:
        """The run's device; under several processes, this process's own (``cuda:<local rank>``)."""
        if self.processes > 1 and self.recipe.device in ("auto", "cuda"):
            from accelerate import PartialState

            return PartialState().device
        return resolve_device(self.recipe.device)

    @property
    def size(self) -> str:
        return self.recipe.models.size

    def artifact(self, stage: str, key: str) -> Any:
        try:
            return self.artifacts[stage][key]
        except KeyError:
            raise AdcError(f"stage {stage!r} has not produced {key!r} yet; add it before this stage "
                           f"or run with --resume in the same --out") from None

    def cached(self, key: str, factory) -> Any:
        if key not in self._cache:
            self._cache[key] = factory()
        return self._cache[key]

    def forget(self, key: str) -> None:
        """Drop a cached model (a stage changed it in place); the next use builds or loads it again."""
        self._cache.pop(key, None)

    def rel(self, path: str | Path) -> str:
        """``path`` relative to the run directory, as artifacts store it (a run directory can be moved)."""
        import os

        return os.path.relpath(path, self.run_dir)

    def resolve(self, path: str | Path) -> Path:
        """An artifact path (relative to the run directory, or absolute) as a usable path."""
        p = Path(path)
        return p if p.is_absolute() else self.run_dir / p

    def note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)

    # ---------------------------------------------------------------- the teacher
    def teacher_checkpoint(self) -> Path | None:
        """The whole-teacher weights adc trained or shipped: this run's ``train_teacher``, else ``models.checkpoint``."""
        if "train_teacher" in self.artifacts:
            return self.resolve(self.artifacts["train_teacher"]["weights"])
        return self.recipe.models.checkpoint

    def teacher_needs(self) -> list[str]:
        """What the teacher needs that the recipe lacks (a tiny or checkpointed teacher needs nothing)."""
        if self.size == "tiny" or self.teacher_checkpoint() is not None:
            return []
        return self.family.teacher_needs(self.weights)

    def has_teacher_weights(self) -> bool:
        return self.teacher_checkpoint() is not None or (self.size == "full" and not self.teacher_needs())

    def teacher(self) -> nn.Module:
        """The frozen teacher on the run's device: the user's weights, or adc's checkpoint of it."""
        return self.cached("teacher", self._load_teacher)

    def _load_teacher(self) -> nn.Module:
        from .io import load_safetensors

        ckpt = self.teacher_checkpoint()
        torch.manual_seed(self.recipe.seed)
        if ckpt is not None and self.size == "tiny":
            model = self.family.build_teacher(self.size, "cpu", self.options)
        else:
            model = self.family.load_teacher(self.size, self.weights, "cpu", self.options)
        if ckpt is not None:
            state = load_safetensors(ckpt)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise AdcError(f"{ckpt}: does not fit the {self.family.name} {self.size} teacher "
                               f"({str(exc).splitlines()[0][:160]})") from None
        elif self.size == "tiny":
            self.note(f"the tiny {self.family.name} teacher has random weights (no models.checkpoint, no "
                      "train_teacher stage): distilling it shows the mechanics, not super-resolution")
        return model.to(self.device).eval().requires_grad_(False)

    def meta_teacher(self) -> nn.Module:
        """The teacher's architecture on ``meta`` (analysis and counting need no weights)."""
        return self.cached("meta_teacher", lambda: self.family.build_teacher(self.size, "meta", self.options))

    # ---------------------------------------------------------------- the student
    def student_state(self):
        """The student handed on by the last stage that made one (reloaded from its folder on resume)."""
        if self.student is None:
            from .student import load_student_state

            path = self.student_dir()
            self.student = load_student_state(path)
        return self.student

    def student_dir(self) -> Path:
        """The newest student folder written by this run (distill > pretrain_decoder > prune > remove)."""
        for stage in ("distill", "pretrain_decoder", "prune", "remove"):
            if "student" in self.artifacts.get(stage, {}):
                return self.resolve(self.artifacts[stage]["student"])
        raise AdcError("no student in this run yet: add a 'remove' stage (and 'prune') before this one")

    def set_student(self, state) -> None:
        self.student, self.student_changed = state, True

    def has_trained_student(self) -> bool:
        return "distill" in self.artifacts
