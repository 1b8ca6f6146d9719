"""The model bundle that stages share: the recipe, the run directory, and models on demand.

Nothing here is global: the runner makes one :class:`Bundle` per run and passes it to every
stage. Models are built (or loaded from the user's local weights, or from an earlier stage's
artifacts) the first time a stage asks for them.
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
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
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

    # ---------------------------------------------------------------- weights the user holds
    def missing_weights(self, *names: str) -> list[str]:
        """Human-readable needs for the named ``models.*`` entries that are not given (full size only)."""
        if self.size == "tiny":
            return []
        what = {
            "sd21_base": "models.sd21_base = an SD 2.1-base diffusers folder (unet/, vae/, text_encoder/)",
            "osediff": "models.osediff = OSEDiff's osediff.pkl",
            "ram": "models.ram = ram_swin_large_14m.pth",
            "dape": "models.dape = DAPE.pth",
            "ram_tag_list": "models.ram_tag_list = RAM's ram_tag_list.txt",
        }
        return [what[n] for n in names if getattr(self.recipe.models, n) is None]

    # ---------------------------------------------------------------- models
    def student_dir(self) -> Path:
        """The newest student written by this run's stages (distill > pretrain_decoder > prune > remove)."""
        for stage in ("distill", "pretrain_decoder", "prune", "remove"):
            if "student" in self.artifacts.get(stage, {}):
                return Path(self.artifacts[stage]["student"])
        raise AdcError("no student in this run yet: add a 'remove' stage (and 'prune') before this one")

    def has_trained_student(self) -> bool:
        return "distill" in self.artifacts

    def student(self) -> nn.Module:
        from .student import load_student

        return load_student(self.student_dir())[0].to(self.device).eval()

    def teacher(self) -> nn.Module:
        """The OSEDiff teacher: the user's weights (full size) or the tiny teacher trained by ``train_teacher``."""
        return self.cached("teacher", self._load_teacher)

    def _load_teacher(self) -> nn.Module:
        from .zoo.osediff import build_osediff, load_osediff_weights

        m = self.recipe.models
        if self.size == "full":
            missing = self.missing_weights("sd21_base", "osediff")
            if missing:
                raise AdcError(f"the teacher needs {'; '.join(missing)}")
            model = load_osediff_weights(m.sd21_base, m.osediff, m.ram, m.dape)
            tokenizer_dir = Path(m.sd21_base) / "tokenizer"
            if tokenizer_dir.is_dir() and m.ram_tag_list is not None:  # DAPE prompts need both, from local files
                from transformers import CLIPTokenizer

                from .zoo.dape import load_tag_list

                model.set_prompting(CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True),
                                    load_tag_list(m.ram_tag_list))
        else:
            torch.manual_seed(self.recipe.seed)
            model = build_osediff("tiny")
            if "train_teacher" in self.artifacts:
                from .io import load_safetensors

                model.load_state_dict(load_safetensors(self.artifact("train_teacher", "weights")))
        return model.to(self.device).eval().requires_grad_(False)
