"""The recipe: the single source of a run's settings, validated into dataclasses.

A recipe names the models (local weight paths, or none), the facts of the task, the data, and
an ordered list of stages. Each stage's own config class lives with the stage
(:mod:`compress.stages`); unknown keys, wrong types, missing paths and stages out of order are
one-line errors naming the key path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import check_range, from_dict, to_dict
from .errors import AdcError

STAGE_ORDER = ("train_teacher", "analyse", "remove", "prune", "pretrain_decoder", "distill",
               "evaluate", "profile", "report")


@dataclass
class ModelsConfig:
    """Where the user's weights are. ``None`` = not available: stages that need them stop the run."""

    size: Literal["full", "tiny"] = "full"
    teacher: Literal["osediff"] = "osediff"
    sd21_base: Path | None = None          # diffusers dir with unet/ vae/ text_encoder/ (SD 2.1-base)
    osediff: Path | None = None            # osediff.pkl (OSEDiff's LoRA layout or AdcSR's merged layout)
    ram: Path | None = None                # ram_swin_large_14m.pth (DAPE backbone)
    dape: Path | None = None               # DAPE.pth (DAPE LoRA)
    ram_tag_list: Path | None = None       # RAM's ram_tag_list.txt (tags -> text for DAPE prompts)

    def validate(self, path: str) -> None:
        for name in ("sd21_base", "osediff", "ram", "dape", "ram_tag_list"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise AdcError(f"{path}.{name}: {value} does not exist")


@dataclass
class TaskConfig:
    """Facts of the task that the analysis and the compressed model rely on."""

    scale: int = 4
    timestep: int = 999
    prompt: Literal["dropped", "fixed", "variable"] = "dropped"
    lr_size: int = 128

    def validate(self, path: str) -> None:
        check_range(self.timestep, 0, 999, f"{path}.timestep")
        if self.lr_size % 16:
            raise AdcError(f"{path}.lr_size: {self.lr_size} is not a multiple of 16")


@dataclass
class DataConfig:
    train_hr: list[Path] = field(default_factory=list)   # HR folders (recursive) for recovery
    eval_lr: Path | None = None
    eval_hr: Path | None = None
    eval_limit: int | None = None                        # evaluate on the first N pairs only
    crop: int = 512
    degradation: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        for i, p in enumerate(self.train_hr):
            if not p.is_dir():
                raise AdcError(f"{path}.train_hr[{i}]: {p} is not a directory")
        for name in ("eval_lr", "eval_hr"):
            p = getattr(self, name)
            if p is not None and not p.is_dir():
                raise AdcError(f"{path}.{name}: {p} is not a directory")


@dataclass
class Stage:
    name: str
    config: Any


@dataclass
class Recipe:
    name: str
    seed: int = 0
    device: str = "auto"
    threads: int | None = None    # torch CPU threads (None = torch's default)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[Stage] = field(default_factory=list)
    source: Path | None = None

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        d = to_dict({k: getattr(self, k) for k in ("name", "seed", "device", "threads", "models", "task", "data")})
        d["stages"] = [{s.name: to_dict(s.config)} for s in self.stages]
        return d


def _set_dotted(d: dict, dotted: str, value: Any, where: str) -> None:
    """Set ``d[a][b][c] = value`` for ``a.b.c``; in the stage list, a key names the stage (``stages.prune.unet``)."""
    keys = dotted.split(".")
    node: Any = d
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            stage = next((s for s in node if isinstance(s, dict) and k in s), None)
            if stage is None:
                raise AdcError(f"{where}: no stage {k!r} in the recipe")
            if stage[k] is None:
                stage[k] = {}
            node = stage[k]
            continue
        if not isinstance(node, dict):
            raise AdcError(f"{where}: {'.'.join(keys[:i])} is not a mapping")
        if node.get(k) is None:
            node[k] = {}
        node = node[k]
    if not isinstance(node, dict):
        raise AdcError(f"{where}: {'.'.join(keys[:-1])} is not a mapping")
    node[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``--set a.b=value`` overrides; the value is read as YAML (numbers, lists, null)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise AdcError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise AdcError(f"--set {item!r}: the value is not valid YAML") from None
        _set_dotted(raw, key.strip(), parsed, f"--set {key}")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise AdcError(f"{path}: recipe not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise AdcError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise AdcError(f"{path}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    return parse_recipe(raw, str(path), base_dir=path.parent)


def _resolve_paths(raw: dict, base_dir: Path) -> dict:
    """Relative paths in ``models`` and ``data`` are relative to the recipe file's folder."""
    raw = copy.deepcopy(raw)

    def fix(v: Any) -> Any:
        if isinstance(v, str) and not Path(v).expanduser().is_absolute():
            return str((base_dir / v).resolve())
        return v

    for section, keys in (("models", ("sd21_base", "osediff", "ram", "dape", "ram_tag_list")),
                          ("data", ("eval_lr", "eval_hr"))):
        sec = raw.get(section)
        if isinstance(sec, dict):
            for k in keys:
                if sec.get(k) is not None:
                    sec[k] = fix(sec[k])
            if section == "data" and isinstance(sec.get("train_hr"), list):
                sec["train_hr"] = [fix(v) for v in sec["train_hr"]]
            elif section == "data" and isinstance(sec.get("train_hr"), str):
                sec["train_hr"] = [fix(sec["train_hr"])]
    return raw


def parse_recipe(raw: dict, where: str = "recipe", base_dir: Path | None = None) -> Recipe:
    from .stages import STAGES  # the stage registry owns each stage's config class

    if base_dir is not None:
        raw = _resolve_paths(raw, base_dir)
    raw = dict(raw)
    stages_raw = raw.pop("stages", None)
    if not isinstance(stages_raw, list) or not stages_raw:
        raise AdcError(f"{where}: stages: expected a non-empty list of stages, e.g. '- analyse: {{}}'")
    if "name" not in raw:
        raise AdcError(f"{where}: name: missing required key")
    head = from_dict(_RecipeHead, raw, where)
    stages: list[Stage] = []
    last = -1
    for i, entry in enumerate(stages_raw):
        spot = f"{where}.stages[{i}]"
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise AdcError(f"{spot}: expected one 'name: {{config}}' mapping")
        (name, cfg), = entry.items()
        if name not in STAGES:
            raise AdcError(f"{spot}: unknown stage {name!r} (expected one of: {', '.join(STAGE_ORDER)})")
        order = STAGE_ORDER.index(name)
        if order <= last:
            raise AdcError(f"{spot}: stage {name!r} cannot come after {STAGE_ORDER[last]!r} "
                           f"(order: {' -> '.join(STAGE_ORDER)})")
        last = order
        stages.append(Stage(name, from_dict(STAGES[name].config_cls, cfg, f"{where}.stages.{name}")))
    return Recipe(name=head.name, seed=head.seed, device=head.device, threads=head.threads, models=head.models, task=head.task,
                  data=head.data, stages=stages, source=Path(where) if base_dir is not None else None)


@dataclass
class _RecipeHead:
    name: str
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    models: ModelsConfig = field(default_factory=ModelsConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
