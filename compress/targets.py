"""What ``--model`` names in ``adc analyse`` and ``adc compare``: a model or a run directory.

* a model name of the families registry (:func:`compress.families.models`): a family's teacher
  (built in, from an ``adc.families`` entry point, or registered by a module given with
  ``--plugin``) or one of its named models (``adcsr``);
* an adc run directory (a folder with ``recipe.resolved.yaml``; ``./NAME`` where a model has its
  name): the run's newest student (the
  last stage's ``student/``), or, before any stage saved one, the run's teacher (its family,
  size and options). The recipe's ``plugins`` are imported first, so runs of plugin families work.

Models are built with random weights, or on ``meta`` (shapes and wiring only: what analysis and
counting need); a run's student on a real device gets its saved weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdcError, did_you_mean

RESOLVED = "recipe.resolved.yaml"


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RESOLVED).is_file()


@dataclass
class Target:
    """One model to analyse or compare, and where it came from."""

    spec: str                  # what the user wrote (a name, or the run directory as a path)
    family: str
    kind: str                  # "teacher", "student" or "part"
    size: str | None           # None: fixed by the run (its recipe, or its saved student)
    name: str | None = None    # the registry name (None for a run's teacher or student)
    run_dir: Path | None = None
    student_dir: Path | None = None
    task: dict[str, Any] = field(default_factory=dict)   # the run's task (prompt, lr_size, ...)
    options: Any = None        # the run's family options (for its teacher)

    @property
    def label(self) -> str:
        if self.run_dir is None:
            return self.spec
        return f"{self.run_dir.name} ({'student' if self.student_dir is not None else 'teacher'})"

    def build(self, size: str = "full", device: Any = "cpu"):
        """The model: with random weights (a name; a run's teacher), or a run's student (its saved
        weights; on ``meta``, its architecture alone)."""
        if self.student_dir is not None:
            return _run_student(self.student_dir, device)
        if self.run_dir is not None:
            from .families import get

            return get(self.family).build_teacher(self.size, device, self.options)
        from .families import build

        return build(self.name, size, device)


def resolve(spec: str | Path, plugins: list[str] | None = None) -> Target:
    """The :class:`Target` that ``spec`` names (after importing ``plugins``); an AdcError says what
    is accepted otherwise."""
    from .families import load_plugins, models

    load_plugins(list(plugins or []), "--plugin")
    path = Path(spec)
    known = models()
    if str(spec) in known:  # a name first: a run directory of the same name is given as ./NAME
        family, kind = known[str(spec)]
        return Target(str(spec), family, kind, None, name=str(spec))
    if is_run_dir(path):
        return _run_target(path)
    if path.is_dir():
        raise AdcError(f"--model {spec}: folder has no {RESOLVED}, so it is not an adc run directory")
    raise AdcError(f"unknown model {str(spec)!r}{did_you_mean(str(spec), known, quote=True)} (known: "
                   f"{', '.join(sorted(known))}; or an adc run directory, with {RESOLVED})")


def _run_target(run_dir: Path) -> Target:
    from .config import from_dict
    from .families import get, load_plugins
    from .recipe import read_recipe_file
    from .student import find_student

    where = str(run_dir / RESOLVED)
    raw = read_recipe_file(run_dir / RESOLVED)
    plugins = raw.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise AdcError(f"{where}.plugins: expected a list of module names, got {plugins!r}")
    load_plugins(plugins, f"{where}.plugins")
    models = raw.get("models")
    if not isinstance(models, dict) or not isinstance(models.get("family"), str):
        raise AdcError(f"{where}.models.family: missing; expected the run's model family")
    try:
        family = get(models["family"])
    except AdcError as exc:
        raise AdcError(f"{where}.models.family: {exc}") from None
    size = models.get("size", "full")
    if size not in ("full", "tiny"):
        raise AdcError(f"{where}.models.size: {size!r} is not one of full, tiny")
    task = raw.get("task") if isinstance(raw.get("task"), dict) else {}
    student = find_student(run_dir)
    options = None if student is not None else from_dict(family.Options, models.get("options"),
                                                         f"{where}.models.options")
    return Target(str(run_dir), family.name, "student" if student is not None else "teacher", size,
                  run_dir=run_dir, student_dir=student, task=dict(task), options=options)


def _run_student(student: Path, device: Any):
    """A saved student: with its weights, or (``device="meta"``, or a structure-only student) its
    architecture replayed from the records on ``meta``."""
    import torch

    from .io import read_format_json
    from .prune.persist import read_record, replay
    from .student import STUDENT_FILE, compose_student, load_student_state

    info = read_format_json(student / STUDENT_FILE, "adc-student", "adc's save_student")
    if torch.device(device).type != "meta":
        if not info.get("weights", True):
            raise AdcError(f"{student}: a structure-only student (no weights saved): it can be counted and analysed "
                           "on meta, not run")
        return load_student_state(student, device).model
    unet = replay(read_record(student / "unet")["chain"], "meta")
    decoder = replay(read_record(student / "decoder")["chain"], "meta")
    return compose_student(unet, decoder, int(info.get("unshuffle", 2)), bool(info.get("color_fix", True))).eval()


__all__ = ["RESOLVED", "Target", "is_run_dir", "resolve"]
