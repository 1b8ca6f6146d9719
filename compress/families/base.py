"""What a model family states, in one place: the contract every stage, report and CLI reads.

A family is one kind of SR model (OSEDiff, S3Diff, a user's own one-step SD model). adc's
stages never name a model: they ask the recipe's family for its teacher, its task facts and
example inputs, the parts its student is made of, the pieces distillation needs and how it is
profiled. A third-party family subclasses :class:`ModelFamily` and calls
:func:`compress.families.register` (or declares an ``adc.families`` entry point, or is listed
under ``plugins:`` in a recipe); nothing under ``compress/`` changes.

Look at NVIDIA ModelOpt's mode registry (one descriptor per mode, plugins per model family)
and diffusers' one-pipeline-class-per-family over shared blocks: the family is that
descriptor, the zoo holds the shared blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from ..errors import AdcError

SIZES = ("full", "tiny")


# --------------------------------------------------------------------------------------------
# Weights and options: validated dataclasses, one per family
# --------------------------------------------------------------------------------------------
@dataclass
class NoWeights:
    """A family that needs no weight files (random init only)."""

    HELP: ClassVar[dict[str, str]] = {}

    def validate(self, path: str) -> None:
        check_paths(self, path)


@dataclass
class NoOptions:
    """A family without options."""


def check_paths(weights: Any, path: str) -> None:
    """Every ``Path`` field that is set must exist (``models.weights.<key>: <path> does not exist``)."""
    for f in dataclasses.fields(weights):
        value = getattr(weights, f.name)
        if isinstance(value, Path) and not value.exists():
            raise AdcError(f"{path}.{f.name}: {value} does not exist")


def path_fields(cls: type) -> list[str]:
    """Names of the fields of a weights dataclass that hold paths (resolved against the working directory)."""
    import typing

    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if Path in typing.get_args(hints[f.name]) or hints[f.name] is Path]


# --------------------------------------------------------------------------------------------
# What the student is made of
# --------------------------------------------------------------------------------------------
@dataclass
class PartSource:
    """One part of the teacher that the student keeps, as a plain module to start from.

    ``path``: where the part sits in the teacher pipeline (the analysis plan names modules by
    it, e.g. ``unet`` or ``vae.decoder``). ``base``: the :func:`compress.prune.base_model`
    record that rebuilds its architecture (the first link of the saved record chain).
    """

    module: nn.Module
    base: Any
    path: str


@dataclass
class StudentParts:
    """The denoiser and the decoder the AdcSR-style student is made of, and where their weights came from."""

    denoiser: PartSource
    decoder: PartSource
    source: str


# --------------------------------------------------------------------------------------------
# What distillation needs
# --------------------------------------------------------------------------------------------
@dataclass
class DistillParts:
    """The family's side of stage 2 (:func:`compress.recover.distill.feature_distill_bundle`).

    ``teacher_latent(lr, prompt_embeds)``: the teacher's one-step latent for LR in [-1, 1],
    as its decoder reads it (scaled). ``decode_input``: latent -> the decoder's ``conv_in``
    input (``post_quant_conv(z / scaling)``). ``real_latent``: HR in [-1, 1] -> the same
    space for ground truth (the discriminator's "real"). ``disc_unet``: the plain UNet the
    discriminator starts from (None: no discriminator possible). ``disc_lora_targets``:
    adapter name -> module names of that UNet that get LoRA. ``prompts(mode, text)``: a
    callable LR -> text embeddings (B, tokens, dim) for the teacher and the discriminator.
    """

    teacher_latent: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    decode_input: nn.Module
    real_latent: nn.Module
    disc_unet: nn.Module | None
    disc_lora_targets: Callable[[nn.Module], dict[str, list[str]]]
    prompts: Callable[[str, str], Callable[[torch.Tensor], torch.Tensor]]
    timestep: int = 999
    teacher: nn.Module | None = None      # the module ``teacher_latent`` runs (moved with the teacher path)
    frozen: dict[str, nn.Module] = field(default_factory=dict)   # other modules to move to the device
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# How the family is profiled
# --------------------------------------------------------------------------------------------
Call = tuple[str, Callable[..., Any], tuple]


@dataclass(frozen=True)
class PipelineSpec:
    """What one deployed inference call runs, and what its numbers include.

    ``calls(model, lr)``: the (label, fn, args) calls of one SR inference (e.g. the prompt
    extractor's tag logits, then the forward). ``mergeable_lora``: LoRA folded into the base
    weights when deployed (MACs exclude it). ``modulated_lora``: LoRA whose A output is mixed by
    an input-dependent matrix (cannot be merged, counted).
    """

    title: str
    calls: Callable[[nn.Module, torch.Tensor], list[Call]]
    mergeable_lora: bool = False
    modulated_lora: bool = False
    includes: str = ""


def forward_only(model: nn.Module, lr: torch.Tensor) -> list[Call]:
    return [("forward", model, (lr,))]


# --------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------
class ModelFamily:
    """Base class of a model family. Subclasses set the class attributes and override the methods.

    Required: :attr:`name`, :meth:`build_teacher`, :meth:`student_parts`. Everything else has a
    default that fits a one-step SD-style model (LR in [-1, 1] -> SR in [-1, 1], x4).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    Weights: ClassVar[type] = NoWeights
    Options: ClassVar[type] = NoOptions
    #: pipeline paths of the student's parts in the teacher (what the plan's decisions refer to)
    denoiser_path: ClassVar[str] = "unet"
    decoder_path: ClassVar[str] = "vae.decoder"
    #: named compressed models of this family (for ``compress.sr --model NAME`` and reports)
    students: ClassVar[dict[str, Callable[..., nn.Module]]] = {}
    #: other named parts that can be built alone (for counting and analysis), e.g. a prompt extractor
    parts: ClassVar[dict[str, Callable[..., nn.Module]]] = {}
    profile: ClassVar[PipelineSpec | None] = None

    # ---------------------------------------------------------------- teacher
    def build_teacher(self, size: str, device: str | torch.device = "cpu", options: Any = None) -> nn.Module:
        """The teacher pipeline with random weights (``device="meta"``: for counting and analysis)."""
        raise NotImplementedError

    def teacher_needs(self, weights: Any) -> list[str]:
        """What a full-size teacher needs that ``weights`` lacks, one readable line per file."""
        return []

    def load_teacher(self, size: str, weights: Any, device: str | torch.device = "cpu",
                     options: Any = None) -> nn.Module:
        """The teacher with the user's weights (full size) or random weights (tiny)."""
        if size == "full":
            raise AdcError(f"family {self.name!r} does not load full-size weights")
        return self.build_teacher(size, device, options)

    def teacher_trainable(self, teacher: nn.Module) -> list[nn.Parameter]:
        """Parameters a from-scratch tiny teacher trains (``train_teacher``); default: all."""
        return list(teacher.parameters())

    @contextlib.contextmanager
    def training_view(self, teacher: nn.Module) -> Iterator[nn.Module]:
        """The module ``train_teacher`` trains and checkpoints (default: the teacher itself)."""
        yield teacher

    def teacher_autoencode(self, teacher: nn.Module, image: torch.Tensor) -> torch.Tensor | None:
        """The teacher's image autoencoder, ``decode(encode(image))`` in [-1, 1], or None if it has none.

        Training a tiny teacher fits it to HR images too: an SD VAE is an autoencoder, and AdcSR's
        decoder pretraining (HR latents -> HR) and discriminator (HR latents as "real") rely on it.
        """
        return None

    def teacher_forward(self, teacher: nn.Module, lr: torch.Tensor, train: bool = False) -> torch.Tensor:
        """SR in [-1, 1] for LR in [-1, 1]: ``train=True`` as training the tiny teacher calls it (a
        family may sample there, as its training script does), else deterministic (for measuring)."""
        return teacher(lr)

    def evaluate_needs(self, weights: Any) -> list[str]:
        """What evaluating the full-size teacher the family's way needs beyond the teacher itself."""
        return []

    def evaluate_teacher(self, teacher: nn.Module, lr01: torch.Tensor, options: Any = None) -> torch.Tensor:
        """SR in [0, 1] for LR in [0, 1] (B,3,h,w), as the family's own test script computes it."""
        return (teacher(lr01 * 2 - 1).float() + 1) / 2

    # ---------------------------------------------------------------- task
    def facts(self, prompt: str, timestep: int):
        """The task facts (:class:`compress.analysis.TaskFacts`) under a prompt policy."""
        from ..analysis.facts import TaskFacts

        return TaskFacts(prompt=prompt, constant={"timestep": timestep})

    def example_inputs(self, lr_size: int, device: str | torch.device = "cpu", teacher: nn.Module | None = None
                       ) -> dict[str, torch.Tensor]:
        """Keyword inputs of one teacher call at ``lr_size`` (what the analysis traces). Inputs named
        in the facts' ``prompt_inputs`` (``prompt_embeds``) are labelled as the prompt, so that its
        policy (dropped, fixed, variable) decides what happens to the modules that read it."""
        return {"lr": torch.zeros(1, 3, lr_size, lr_size, device=device)}

    def analysis_pipeline(self, teacher: nn.Module) -> nn.Module:
        """The module the analysis traces (default: the teacher itself)."""
        return teacher

    def analysis_call(self, teacher: nn.Module, **inputs: Any) -> Any:
        """One deployed inference as the analysis traces (and counts) it: the calls of
        :meth:`pipeline_spec`, so the analysis and the profile count the same pipeline."""
        out = None
        for label, fn, args in self.pipeline_spec().calls(teacher, inputs["lr"]):
            if label == "forward":  # with every example input (e.g. the prompt embedding), not just the LR
                out = teacher(**inputs)
            else:
                result = fn(*args)  # e.g. a prompt extractor: it costs, its output reaches no tensor op
                out = result if out is None else out
        return out

    # ---------------------------------------------------------------- student
    def student_parts(self, size: str, weights: Any, init: str, teacher: Callable[[], nn.Module],
                      device: str | torch.device = "cpu") -> StudentParts:
        """The plain denoiser and decoder the student starts from.

        ``init``: ``"base"`` (the family's base model weights, e.g. SD 2.1-base for AdcSR),
        ``"teacher"`` (the teacher's own weights, LoRA merged), ``"random"``; ``teacher()``
        builds/loads the teacher when needed. Without weights the parts are built on ``meta``
        (structure only: analysis, pruning and counting need no values).
        """
        raise NotImplementedError

    def init_choices(self) -> tuple[str, ...]:
        return ("base", "teacher", "random")

    def init_needs(self, init: str, weights: Any) -> list[str]:
        """What ``init`` needs that ``weights`` lacks (empty: it can run)."""
        return []

    # ---------------------------------------------------------------- distillation
    def distill_parts(self, teacher: nn.Module, size: str, weights: Any, options: Any = None) -> DistillParts:
        raise AdcError(f"family {self.name!r} does not define distillation (distill_parts)")

    def distill_needs(self, weights: Any, prompt: str) -> list[str]:
        return self.teacher_needs(weights)

    def real_vae_needs(self, weights: Any) -> list[str]:
        """What the VAE of the ground-truth path (stage 1 latents, stage 2 'real') needs."""
        return self.teacher_needs(weights)

    def real_vae(self, size: str, weights: Any, teacher: Callable[[], nn.Module]) -> nn.Module:
        """The frozen VAE whose encoder makes ground-truth latents (stage 1 and stage 2's real path)."""
        raise AdcError(f"family {self.name!r} does not define the ground-truth VAE (real_vae)")

    # ---------------------------------------------------------------- recipes
    def migration_hint(self, key: str, models: dict) -> str | None:
        """How to rewrite ``models.<key>`` of an earlier recipe schema, if this family used that key."""
        return None

    # ---------------------------------------------------------------- profiling
    def pipeline_spec(self) -> PipelineSpec:
        return self.profile or PipelineSpec(self.title or self.name, forward_only)

    def __repr__(self) -> str:
        return f"<family {self.name}>"


__all__ = ["ModelFamily", "NoWeights", "NoOptions", "PartSource", "StudentParts", "DistillParts", "PipelineSpec",
           "forward_only", "check_paths", "path_fields", "SIZES", "Call"]
