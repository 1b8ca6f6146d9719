"""The recipe: the single source of a run's settings, validated into dataclasses.

A recipe names the model family and its local weight files, the facts of the task, the data,
and an ordered list of stages::

    name: adcsr
    plugins: [my_package.families]          # optional: modules that register families
    models: {family: FAMILY, size: full, weights: {...the family's files...}, options: {...}}
    task: {scale: 4, timestep: 999, prompt: dropped, lr_size: 128}
    data: {train_hr: [...], eval_lr: ..., eval_hr: ..., degradation: {...}}
    stages: [analyse, remove, prune, ...]

Each stage's config class lives with the stage (:mod:`compress.stages`); the weights and
options classes with the family (:mod:`compress.families`). Unknown keys, wrong types,
missing paths and stages out of order are one-line errors naming the key path. Paths in the
file are relative to its folder; paths given with ``--set`` are relative to the working
directory.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from .config import ranged, check_range, from_dict, to_dict
from .errors import AdcError, did_you_mean, short_repr

STAGE_ORDER = ("train_teacher", "analyse", "remove", "prune", "pretrain_decoder", "distill",
               "evaluate", "profile", "quantize", "report")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ModelsConfig:
    """The model family, its size, the user's local weight files and the family's options.

    ``weights``/``options`` are the family's own dataclasses (:attr:`ModelFamily.Weights`,
    :attr:`ModelFamily.Options`). ``checkpoint``: a safetensors of the whole teacher module
    written by adc (the ``train_teacher`` stage, or the tiny teacher shipped in ``data/``),
    loaded on top of the family's teacher.
    """

    family: str
    size: Literal["full", "tiny"] = "full"
    weights: Any = None
    options: Any = None
    checkpoint: Path | None = None

    def validate(self, path: str) -> None:
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise AdcError(f"{path}.checkpoint: {self.checkpoint} is not a file")


@dataclass
class TaskConfig:
    """Facts of the task that the analysis and the compressed model rely on."""

    scale: int = ranged(4, 1, 16)
    timestep: int = ranged(999, 0, 999)
    prompt: Literal["dropped", "fixed", "variable"] = "dropped"
    lr_size: int = ranged(128, 16, 8192)

    def validate(self, path: str) -> None:
        check_range(self.timestep, 0, 999, f"{path}.timestep")
        if self.lr_size < 16 or self.lr_size % 16:
            raise AdcError(f"{path}.lr_size: {self.lr_size} is not a positive multiple of 16")
        if self.scale < 1:
            raise AdcError(f"{path}.scale: expected a positive integer, got {self.scale}")


def _holds_images(folder: Path, recursive: bool) -> bool:
    """Whether ``folder`` has at least one image file (stops at the first: cheap on LSDIR's 85k)."""
    from .data.images import IMAGE_EXTENSIONS

    pattern = "**/*" if recursive else "*"
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.glob(pattern))


@dataclass
class DataConfig:
    """Images for recovery and evaluation, and the LR synthesis every training stage shares."""

    train_hr: list[Path] = field(default_factory=list)   # HR folders (recursive) for recovery
    eval_lr: Path | None = None
    eval_hr: Path | None = None
    eval_limit: int | None = ranged(None, 1, 10**9)  # evaluate (and measure stages) on the first N pairs
    degradation: Any = None                              # compress.data.DegradationConfig (AdcSR's values)

    def __post_init__(self) -> None:
        if self.degradation is None:
            from .data import DegradationConfig

            self.degradation = DegradationConfig()

    def validate(self, path: str) -> None:
        from .data import DegradationConfig

        # here, when the recipe loads: an empty folder found by the stage that reads it would come
        # after the stages before it had run (minutes to hours)
        for i, p in enumerate(self.train_hr):
            if not p.is_dir():
                raise AdcError(f"{path}.train_hr[{i}]: {p} is not a directory")
            if not _holds_images(p, recursive=True):
                raise AdcError(f"{path}.train_hr[{i}]: {p} holds no images (.png, .jpg, ..., searched recursively)")
        for name in ("eval_lr", "eval_hr"):
            p = getattr(self, name)
            if p is not None and not p.is_dir():
                raise AdcError(f"{path}.{name}: {p} is not a directory")
            if p is not None and not _holds_images(p, recursive=False):
                raise AdcError(f"{path}.{name}: {p} holds no images (.png, .jpg, ...)")
        if (self.eval_lr is None) != (self.eval_hr is None):
            raise AdcError(f"{path}.{'eval_hr' if self.eval_hr is None else 'eval_lr'}: missing; evaluation needs "
                           "both eval_lr and eval_hr")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise AdcError(f"{path}.eval_limit: expected a positive integer, got {self.eval_limit}")
        if not isinstance(self.degradation, DegradationConfig):
            self.degradation = DegradationConfig.from_dict(self.degradation or {}, f"{path}.degradation")


@dataclass
class Stage:
    name: str
    config: Any


@dataclass
class Recipe:
    name: str
    seed: int = ranged(0, 0, 2**32 - 1)
    device: str = "auto"
    threads: int | None = ranged(None, 1, 1024)    # torch CPU threads (None = torch's default)
    plugins: list[str] = field(default_factory=list)
    models: ModelsConfig | None = None
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[Stage] = field(default_factory=list)
    source: Path | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def family(self):
        from .families import get

        return get(self.models.family)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        d = to_dict({k: getattr(self, k) for k in ("name", "seed", "device", "threads", "plugins", "models", "task")})
        d["data"] = to_dict({k: getattr(self.data, k) for k in ("train_hr", "eval_lr", "eval_hr", "eval_limit")})
        d["data"]["degradation"] = self.data.degradation.to_dict()
        d["stages"] = [{s.name: to_dict(s.config)} for s in self.stages]
        return d


# --------------------------------------------------------------------------------------------
# --set overrides
# --------------------------------------------------------------------------------------------
def _set_dotted(d: dict, dotted: str, value: Any, where: str) -> None:
    """Set ``d[a][b][c] = value`` for ``a.b.c``; in the stage list, a key names the stage (``stages.prune.unet``)."""
    keys = dotted.split(".")
    node: Any = d
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            stage = next((s for s in node if isinstance(s, dict) and k in s), None)
            if stage is None:
                names = [n for s in node for n in ([s] if isinstance(s, str) else s if isinstance(s, dict) else [])]
                raise AdcError(f"{where}: no stage {k!r} in the recipe{did_you_mean(k, names)}")
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
    from .yaml_io import parse_yaml_value

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(raw, key, parse_yaml_value(value, f"--set {key}"), f"--set {key}")
    return raw


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise AdcError(f"--set {item!r}: expected key=value")
    key, value = item.split("=", 1)
    return key.strip(), value


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def read_recipe_file(path: Path) -> dict:
    """The recipe's mapping (size-capped, UTF-8, no duplicate keys or alias bombs: :mod:`compress.yaml_io`)."""
    from .yaml_io import load_yaml

    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise AdcError(f"{path}: expected a mapping at the top level")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None, cwd: Path | None = None) -> Recipe:
    """Read, override (``--set``), resolve paths and validate a recipe file."""
    path = Path(path)
    overrides = list(overrides or [])
    raw = read_recipe_file(path)
    _load_plugins(raw, str(path))
    raw = _resolve_paths(raw, path.parent)
    from .yaml_io import parse_yaml_value

    parsed = []
    for item in overrides:
        key, value = _split_override(item)
        parsed.append((key, parse_yaml_value(value, f"--set {key}")))
    family = _family_name(raw, *[{"models": {"family": v}} for k, v in parsed if k == "models.family"])
    for key, value in parsed:
        if key.split(".")[0] in ("models", "data"):  # paths given on the command line: relative to the cwd
            mini: dict = {}
            _set_dotted(mini, key, value, f"--set {key}")
            node: Any = _resolve_paths(mini, cwd or Path.cwd(), family)
            for k in key.split("."):
                node = node[k]
            value = node
        _set_dotted(raw, key, value, f"--set {key}")
    recipe = parse_recipe(raw, str(path))
    recipe.source, recipe.overrides = path, overrides
    return recipe


def _family_name(*raws: dict) -> str | None:
    name = None
    for raw in raws:
        models = raw.get("models")
        if isinstance(models, dict) and isinstance(models.get("family"), str):
            name = models["family"]
    return name


def _resolve_paths(raw: dict, base_dir: Path, family: str | None = None) -> dict:
    """Relative paths (weights, checkpoint, data folders) made absolute against ``base_dir``."""
    raw = copy.deepcopy(raw)

    def fix(v: Any) -> Any:
        if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
            return str((base_dir / Path(v).expanduser()).resolve())
        return v

    _load_plugins(raw)
    models = raw.get("models")
    if isinstance(models, dict):
        if models.get("checkpoint") is not None:
            models["checkpoint"] = fix(models["checkpoint"])
        weights = models.get("weights")
        name = family or _family_name(raw)
        if isinstance(weights, dict) and name is not None:
            from .families import get
            from .families.base import path_fields

            try:
                keys = path_fields(get(name).Weights)
            except AdcError:
                keys = []  # an unknown family is reported, with the key path, by parse_recipe
            for k in keys:
                if weights.get(k) is not None:
                    weights[k] = fix(weights[k])
    data = raw.get("data")
    if isinstance(data, dict):
        for k in ("eval_lr", "eval_hr"):
            if data.get(k) is not None:
                data[k] = fix(data[k])
        if isinstance(data.get("train_hr"), list):
            data["train_hr"] = [fix(v) for v in data["train_hr"]]
        elif isinstance(data.get("train_hr"), str):
            data["train_hr"] = [fix(data["train_hr"])]
    return raw


def _load_plugins(raw: dict, where: str = "recipe") -> list[str]:
    plugins = raw.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise AdcError(f"{where}.plugins: expected a list of module names, got {plugins!r}")
    from .families import load_plugins

    load_plugins(plugins, f"{where}.plugins")
    return plugins


def _parse_models(raw: Any, where: str) -> ModelsConfig:
    from .families import available, get

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise AdcError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {"family", "size", "weights", "options", "checkpoint"}
    for key in [k for k in raw if k not in known]:
        for name in available():  # a key of an earlier schema: the family that used it says how to migrate
            hint = get(name).migration_hint(key, raw)
            if hint:
                raise AdcError(f"{where}.{key}: the recipe schema changed: {hint}")
    if "family" not in raw:
        raise AdcError(f"{where}.family: missing required key (one of: {', '.join(available())})")
    raw = dict(raw)
    weights, options = raw.pop("weights", None), raw.pop("options", None)
    head = from_dict(ModelsConfig, raw, where)
    try:
        family = get(head.family)
    except AdcError as exc:
        raise AdcError(f"{where}.family: {exc}") from None
    head.weights = from_dict(family.Weights, weights, f"{where}.weights")
    head.options = from_dict(family.Options, options, f"{where}.options")
    return head


def parse_recipe(raw: dict, where: str = "recipe") -> Recipe:
    """A :class:`Recipe` from a mapping whose paths are already resolved."""
    from .stages import STAGES  # the stage registry owns each stage's config class

    raw = dict(raw)
    plugins = _load_plugins(raw, where)
    stages_raw = raw.pop("stages", None)
    if not isinstance(stages_raw, list) or not stages_raw:
        raise AdcError(f"{where}: stages: expected a non-empty list of stages, e.g. '- analyse: {{}}'")
    if "name" not in raw:
        raise AdcError(f"{where}: name: missing required key")
    models_raw = raw.pop("models", None)
    head = from_dict(_RecipeHead, raw, where)
    models = _parse_models(models_raw, f"{where}.models")
    if not _NAME.match(head.name):
        raise AdcError(f"{where}.name: {short_repr(head.name)} must be a plain name (letters, digits, '.', '_', '-'; no "
                       "path separators): it names the run directory runs/<name>")
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
            hint = did_you_mean(name, STAGE_ORDER)
            raise AdcError(f"{spot}: unknown stage {name!r}{hint}" if hint else
                           f"{spot}: unknown stage {name!r} (expected one of: {', '.join(STAGE_ORDER)})")
        order = STAGE_ORDER.index(name)
        if order <= last:
            raise AdcError(f"{spot}: stage {name!r} cannot come after {STAGE_ORDER[last]!r} "
                           f"(order: {' -> '.join(STAGE_ORDER)})")
        last = order
        stages.append(Stage(name, from_dict(STAGES[name].config_cls, cfg, f"{where}.stages.{name}")))
    recipe = Recipe(name=head.name, seed=head.seed, device=head.device, threads=head.threads, plugins=plugins,
                    models=models, task=head.task, data=head.data, stages=stages)
    for stage in recipe.stages:  # checks that need the whole recipe (the family, the data, other stages)
        check = getattr(STAGES[stage.name], "check", None)
        if check is not None:
            check(recipe, stage.config, f"{where}.stages.{stage.name}")
    return recipe


@dataclass
class _RecipeHead:
    name: str
    seed: int = ranged(0, 0, 2**32 - 1)
    device: str = "auto"
    threads: int | None = ranged(None, 1, 1024)
    plugins: list[str] = field(default_factory=list)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
