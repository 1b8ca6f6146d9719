"""The one registry of model families (and of the named models they bring).

Built in: ``osediff`` (SD 2.1-base + LoRA + DAPE; the AdcSR flagship), ``s3diff`` (SD-Turbo +
degradation-guided LoRA) and ``onestep`` (a user's own ``UNet2DConditionModel`` +
``AutoencoderKL`` from a local diffusers folder). Third-party families come from

* ``register(MyFamily())`` in the user's code;
* an entry point in the group ``adc.families`` (``name = "pkg.module:MyFamily"``);
* a recipe's ``plugins: [pkg.module]``: the module is imported and registers itself.

``get(name)`` returns the family; ``build(name, size, device)`` builds a family's teacher or
one of its named compressed models (``adcsr``) with random weights, for tests, counting and
``compress.sr --model NAME``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from ..errors import AdcError
from .base import (SIZES, DistillParts, ModelFamily, NoOptions, NoWeights, PartSource, PipelineSpec, StudentParts,
                   forward_only)

ENTRY_POINT_GROUP = "adc.families"
FLAGSHIP = "osediff"  # the family of AdcSR's teacher: what tiny benchmarks and tests use by default
_BUILTIN = {
    "osediff": "compress.families.osediff:OSEDiffFamily",
    "s3diff": "compress.families.s3diff:S3DiffFamily",
    "onestep": "compress.families.onestep:OneStepFamily",
}
_FAMILIES: dict[str, ModelFamily] = {}
_scanned = False


def _instance(obj: Any, where: str) -> ModelFamily:
    family = obj() if isinstance(obj, type) else obj
    if not isinstance(family, ModelFamily):
        raise AdcError(f"{where}: {type(family).__name__} is not a compress.families.ModelFamily")
    if not family.name or not isinstance(family.name, str):
        raise AdcError(f"{where}: {type(family).__name__}.name is not set")
    return family


def register(family: ModelFamily | type, *, replace: bool = False) -> ModelFamily:
    """Make ``family`` (an instance or a subclass of :class:`ModelFamily`) available by its name."""
    fam = _instance(family, "register")
    if fam.name in _FAMILIES and not replace and type(_FAMILIES[fam.name]) is not type(fam):
        raise AdcError(f"family {fam.name!r} is already registered ({type(_FAMILIES[fam.name]).__name__}); "
                       "pass replace=True to replace it")
    _FAMILIES[fam.name] = fam
    return fam


def _import(target: str, where: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise AdcError(f"{where}: cannot import {module!r} ({exc})") from None
    if not attr:
        return mod
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise AdcError(f"{where}: {module!r} has no {attr!r}") from None


def _scan_entry_points() -> None:
    global _scanned
    if _scanned:
        return
    _scanned = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _FAMILIES:
            register(_import(ep.value, f"entry point {ep.name!r} ({ENTRY_POINT_GROUP})"))


def load_plugins(modules: list[str], where: str = "plugins") -> None:
    """Import each module (it registers its families when imported)."""
    for i, name in enumerate(modules):
        _import(name, f"{where}[{i}]")


def get(name: str) -> ModelFamily:
    """The family registered under ``name``."""
    if name not in _FAMILIES and name in _BUILTIN:
        register(_import(_BUILTIN[name], f"family {name!r}"))
    if name not in _FAMILIES:
        _scan_entry_points()
    if name not in _FAMILIES:
        raise AdcError(f"unknown model family {name!r}; known: {', '.join(available())} "
                       f"(add one with compress.families.register, an '{ENTRY_POINT_GROUP}' entry point "
                       "or a recipe's plugins: [module])")
    return _FAMILIES[name]


def available() -> list[str]:
    _scan_entry_points()
    return sorted(set(_BUILTIN) | set(_FAMILIES))


def models() -> dict[str, tuple[str, str]]:
    """Every buildable model name -> (family, "teacher", "student" or "part")."""
    out: dict[str, tuple[str, str]] = {}
    for fam_name in available():
        fam = get(fam_name)
        out[fam_name] = (fam_name, "teacher")
        for student in fam.students:
            out.setdefault(student, (fam_name, "student"))
        for part in fam.parts:
            out.setdefault(part, (fam_name, "part"))
    return out


def build(name: str, size: str = "full", device: str | torch.device = "cpu") -> nn.Module:
    """A family's teacher (``name`` = the family) or one of its named models, with random weights."""
    if size not in SIZES:
        raise AdcError(f"model size {size!r} is not one of {', '.join(SIZES)}")
    known = models()
    if name not in known:
        raise AdcError(f"unknown model {name!r}; known: {', '.join(sorted(known))}")
    fam_name, kind = known[name]
    fam = get(fam_name)
    if kind == "teacher":
        return fam.build_teacher(size, device)
    builder = fam.students[name] if kind == "student" else fam.parts[name]
    return builder(size=size, device=device)


__all__ = ["ModelFamily", "NoWeights", "NoOptions", "PartSource", "StudentParts", "DistillParts", "PipelineSpec",
           "forward_only", "register", "get", "available", "models", "build", "load_plugins", "ENTRY_POINT_GROUP",
           "FLAGSHIP"]
