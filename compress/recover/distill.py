"""Stage 2: adversarial distillation of a compressed student from a frozen teacher.

General part: a :class:`DistillBundle` names a trainable ``student``, a frozen ``teacher``,
a list of :class:`FeaturePair` ``(student_layer, teacher_layer, loss)`` -- a layer is a module
name whose output is captured with a forward hook ("" = the module's output) or a callable on
the output -- and optionally a discriminator judging one student feature against "real" samples
from a frozen ``real`` module. ``make_inputs(batch, device)`` turns a data batch into the
inputs of each model (e.g. synthesises the LR). Nothing here knows about AdcSR, so an
S3Diff-derived student reuses it with its own bundle.

    loss_G = sum_k w_k * loss_k(student_k, teacher_k) + adv_weight * g_loss(D(fake))
    loss_D = d_loss(D(real), D(fake.detach()))

AdcSR instance (:func:`adcsr_bundle`, verified against the official ``train.py``):

* student: ``AdcSR.features(lr)`` = pruned UNet + trainable decoder ``mid_block``;
* teacher target: the teacher's one-step x0 latent -> / scaling -> ``vae.post_quant_conv`` ->
  frozen stage-1 decoder ``conv_in`` -> frozen decoder ``mid_block``;
* real samples for D: HR -> VAE encoder latent mean (no scaling) -> ``post_quant_conv`` ->
  the same ``conv_in`` -> ``mid_block``;
* D: a copy of the SD UNet with a new ``conv_in`` (feature channels -> UNet width, the old
  weight repeated along the inputs / repeat count) and rank-4 LoRA (three adapters by the same grep as the teacher's),
  trained with ``conv_in``; run at t = 999 with a prompt embedding; its raw output is the
  per-location logits, mean-reduced;
* non-saturating losses: ``softplus(-D(fake))`` for G, ``softplus(D(fake)) + softplus(-D(real))``
  for D; G Adam 1e-4 with step decay (x0.5 at 100 K of 200 K), D Adam 1e-6;
* LR synthesised from HR crops with the Real-ESRGAN degradation, seeded per item (epoch, index)
  so runs are reproducible, resumable and independent of the process count. AdcSR's
  1200-pair shuffling pool is not used (it would tie an item's LR to the batches before it).

Options beside AdcSR's objective (``DistillConfig``; all off by default, and then nothing above
changes): output-level distillation (``output_weight``: the student's SR image against the
teacher's, in pixels, optionally with ``train_up``: the student's up path trains too), the
"latent" variant (``unet_out_weight``: the student UNet's output against the teacher's decoder
``conv_in`` output), a closed-form least-squares start of the new ``conv_in``
(``init_conv_in: lstsq``, :mod:`compress.recover.init`; done by the stage, before training), and
block-wise feature distillation as BK-SDM does (``block_weight``: each student UNet block against
the teacher UNet's, through a trained 1x1 projector where the student is narrower).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..config import ranged, from_dict, to_dict
from ..errors import AdcError
from ..log import get_logger
from ..io import atomic_torch_save, atomic_write_json, save_safetensors
from .decoder_pretrain import generator_adv_loss, hr_crops
from .engine import EngineConfig, StepContext, TrainSetup, frozen_parameters, process_state, item_seed, train, upcast

Layer = str | Callable[[Any], torch.Tensor]
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": lambda s, t: (s - t).abs().mean(),
    "mse": lambda s, t: (s - t).pow(2).mean(),
    "smooth_l1": lambda s, t: F.smooth_l1_loss(s, t),
    # L1 over the target's mean magnitude (per batch, no gradient through it): blocks of different
    # scales weigh alike, so a deep block with large activations does not drown the shallow ones
    "l1_rel": lambda s, t: (s - t).abs().mean() / t.detach().abs().mean().clamp_min(1e-8),
}


# --------------------------------------------------------------------------------------------
# General distillation
# --------------------------------------------------------------------------------------------
@dataclass
class FeaturePair:
    """One distillation term: ``weight * loss(student_layer, teacher_layer)``.

    A layer is a module name inside the student / teacher module (its forward output is
    captured by a hook; a tuple output gives its first element), ``""`` for the module's own
    output, or a callable applied to that output.
    """

    student: Layer
    teacher: Layer
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "l1"
    weight: float = 1.0
    name: str = "feat"

    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if callable(self.loss):
            return self.loss
        if self.loss not in LOSSES:
            raise AdcError(f"feature pair {self.name!r}: loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        return LOSSES[self.loss]


@contextlib.contextmanager
def capture(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on the named submodules of ``module``; yields {name: output} as they run."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            raise AdcError(f"no submodule {name!r} in {type(module).__name__} to take features from") from None

        def hook(_m, _inp, output, name=name):
            out[name] = output[0] if isinstance(output, (tuple, list)) else output

        handles.append(sub.register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


class BlockProjectors(nn.Module):
    """1x1 convs from a student feature's width to its teacher's, one per feature pair whose widths differ
    (channel pruning): block-wise distillation needs the student's narrower block in the teacher's space.

    A training aid, as in FitNets/BK-SDM: trained with the student (same optimiser), kept in the
    engine's checkpoints so a resume is exact, never part of the saved student. ``forward({pair:
    feature})`` projects the pairs it has a conv for and passes the others through. :meth:`fit`
    sets each conv by ridge least squares on one batch (the engine calls it on the first), so the
    term starts from the best linear match instead of from a random map.
    """

    def __init__(self, widths: Mapping[str, tuple[int, int]], device=None, dtype=None):
        super().__init__()
        self.convs = nn.ModuleDict({name: nn.Conv2d(cs, ct, 1, device=device, dtype=dtype)
                                    for name, (cs, ct) in widths.items() if cs != ct})

    def forward(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self.convs[n](x) if n in self.convs else x for n, x in feats.items()}

    @torch.no_grad()
    def fit(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, ridge: float = 1e-3
            ) -> dict[str, tuple[float, float]]:
        """Ridge least squares per conv (``ridge`` relative to the mean diagonal, as
        :mod:`compress.recover.init`); ``reduce`` sums the normal equations over processes, so every
        process sets the same weights. Returns {pair: (relative residual before, after)}."""
        from .init import RidgeFit, conv_as_matrix

        out = {}
        for name, conv in self.convs.items():
            s, t = student[name], teacher[name]
            stats = RidgeFit()
            stats.add(s.permute(0, 2, 3, 1).reshape(-1, s.shape[1]), t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]))
            if reduce is not None:
                stats.gram, stats.cross, stats.ysum = reduce(stats.gram), reduce(stats.cross), reduce(stats.ysum)
                tot = reduce(torch.tensor([stats.yy, float(stats.rows)], dtype=torch.float64, device=s.device))
                stats.yy, stats.rows = float(tot[0]), int(tot[1])
            before = stats.residual(conv_as_matrix(conv).to(stats.gram.device))
            w = stats.solve(ridge)
            conv.weight.copy_(w[:-1].T.reshape(conv.weight.shape).to(conv.weight.dtype))
            conv.bias.copy_(w[-1].to(conv.bias.dtype))
            out[name] = (before, stats.residual(w))
        return out


def pick(layer: Layer, output: Any, captured: Mapping[str, torch.Tensor], side: str) -> torch.Tensor:
    if callable(layer):
        return layer(output)
    if layer == "":
        return output
    if layer not in captured:
        raise AdcError(f"{side} layer {layer!r} did not run in the forward pass")
    return captured[layer]


def call(module: nn.Module, arg: Any) -> Any:
    """Call with a dict as keywords, a tuple as positional arguments, anything else as one argument."""
    if isinstance(arg, Mapping):
        return module(**arg)
    if isinstance(arg, tuple):
        return module(*arg)
    return module(arg)


@dataclass
class DistillBundle:
    """Everything stage 2 needs, for any student/teacher family.

    ``make_inputs(batch, device) -> {"student": ..., "teacher": ..., "real": ..., "disc": {...}}``
    (no gradients; ``batch`` is a data batch with ``epoch``/``index`` per item for seeding).
    ``discriminator(fake_or_real, **inputs["disc"]) -> logits``; its trainable parameters are
    the ones with ``requires_grad``. ``adv_on``: the student layer D judges (default: the
    student side of the first pair). ``export(student, run_dir) -> {name: path}`` writes the
    trained student in the family's formats (main process only). ``projectors``: a
    :class:`BlockProjectors` for the pairs whose student feature must be mapped to the teacher's
    width (trained and checkpointed with the student, not part of it).
    """

    student: nn.Module
    teacher: nn.Module
    pairs: list[FeaturePair]
    make_inputs: Callable[[dict, torch.device], dict]
    discriminator: nn.Module | None = None
    real: nn.Module | None = None
    adv_on: Layer | None = None
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    export: Callable[[nn.Module, Path], dict[str, str]] | None = None
    notes: list[str] = field(default_factory=list)
    projectors: BlockProjectors | None = None

    def __post_init__(self) -> None:
        if not self.pairs:
            raise AdcError("distill: at least one feature pair is needed")
        names = [p.name for p in self.pairs]
        if len(set(names)) != len(names):
            raise AdcError(f"distill: feature pair names must be unique, got {names}")
        if self.projectors is not None and set(self.projectors.convs) - set(names):
            extra = sorted(set(self.projectors.convs) - set(names))
            raise AdcError(f"distill: projectors {extra} name no feature pair")
        if (self.discriminator is None) != (self.real is None):
            raise AdcError("distill: the discriminator needs a 'real' feature module and vice versa")


@dataclass
class DistillConfig:
    """Stage-2 settings; defaults are AdcSR's ``train.py`` (steps, batch and decay in engine/here)."""

    train_hr: list[Path] = field(default_factory=list)
    crop: int = ranged(512, 16, 8192)
    hflip: bool = True
    lr_g: float = ranged(1e-4, 1e-12, 1.0)
    betas_g: tuple[float, float] = (0.9, 0.999)
    lr_milestones: list[int] = field(default_factory=lambda: [100_000])
    lr_gamma: float = ranged(0.5, 1e-06, 1.0)
    lr_d: float = ranged(1e-6, 1e-12, 1.0)
    betas_d: tuple[float, float] = (0.9, 0.999)
    feature_loss: Literal["l1", "mse", "smooth_l1"] = "l1"
    feature_weight: float = ranged(1.0, 0, 1e6)
    adv_weight: float = ranged(1.0, 0, 1e6)                    # 0 = no discriminator
    adv_loss: Literal["non_saturating", "hinge"] = "non_saturating"
    adv_start: int = ranged(1, 0, 10**9)                         # first step with the adversarial terms
    prompt: Literal["dape", "fixed", "empty"] = "dape"
    prompt_text: str = ""                      # for prompt: fixed (needs the teacher's tokenizer)
    lora_rank: int = ranged(4, 1, 4096)
    degradation: dict[str, Any] = field(default_factory=dict)
    # Options beside AdcSR's objective (all off by default: the official stage 2, unchanged).
    # Output-level distillation: the student's SR image against the teacher's (its full one-step path
    # and full decoder, from the same LR), both after the student's colour fix to the LR, as deployed
    # (output_color_fix: false = before it; see feature_distill_bundle for why and what it measured).
    output_weight: float = ranged(0.0, 0, 1e6)
    output_loss: Literal["l1", "mse"] = "l1"
    output_color_fix: bool = True
    train_up: bool = False                     # the student's up path trains too (needs output_weight > 0)
    # "latent" variant: the student UNet's output against the teacher's decoder conv_in output
    # (the mid-block's input: the nearest thing to a latent the student has)
    unet_out_weight: float = ranged(0.0, 0, 1e6)
    # closed-form start for the new PixelUnshuffle conv_in (compress.recover.init)
    init_conv_in: Literal["as_is", "lstsq"] = "as_is"
    init_crops: int = ranged(32, 1, 100000)  # calibration LR crops (training data, its degradation, own seed)
    init_ridge: float = ranged(1e-3, 0, 1e6)                   # relative to the mean diagonal of the normal equations
    # Block-wise feature distillation (BK-SDM): each student UNet block's output against the same block of
    # the teacher's UNet on its own latent path (same spatial size: both UNets run at LR/2), through a
    # trained 1x1 projector where the student is narrower, L1 over the teacher feature's mean magnitude.
    # block_weight weighs the mean over the blocks; block_layers: UNet block names (default: every
    # down_blocks.*, mid_block, up_blocks.*).
    block_weight: float = ranged(0.0, 0, 1e6)
    block_layers: list[str] = field(default_factory=list)
    # memory levers (the official code's choices are the defaults)
    frozen_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # teacher, real path, prompts: inference only
    optimizer: Literal["adam", "adam8bit"] = "adam"          # adam8bit: bitsandbytes' 8-bit Adam states
    engine: EngineConfig = field(default_factory=EngineConfig)

    ENGINE_DEFAULTS = {"max_steps": 200_000, "batch_size": 96, "checkpoint_every": 10_000}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, path: str = "distill") -> "DistillConfig":
        return from_dict(cls, dict(d or {}), path)

    def validate(self, path: str) -> None:
        if self.crop < 16 or self.crop % 16:
            raise AdcError(f"{path}.crop: expected a positive multiple of 16 (LR = crop/4 must divide by 4), got {self.crop}")
        for name in ("lr_g", "lr_d", "lr_gamma"):
            if not getattr(self, name) > 0:
                raise AdcError(f"{path}.{name}: expected a positive number, got {getattr(self, name)}")
        for name in ("feature_weight", "adv_weight", "output_weight", "unet_out_weight", "init_ridge", "block_weight"):
            if getattr(self, name) < 0:
                raise AdcError(f"{path}.{name}: expected >= 0, got {getattr(self, name)}")
        if self.block_layers and not self.block_weight > 0:
            raise AdcError(f"{path}.block_layers: used only by block-wise distillation; set block_weight > 0 "
                           "(or leave block_layers out)")
        for i, layer in enumerate(self.block_layers):
            if not isinstance(layer, str) or not layer.strip() or layer != layer.strip():
                raise AdcError(f"{path}.block_layers[{i}]: expected a UNet block name (e.g. down_blocks.0), "
                               f"got {layer!r}")
        if len(set(self.block_layers)) != len(self.block_layers):
            raise AdcError(f"{path}.block_layers: each block once, got {self.block_layers}")
        if self.train_up and not self.output_weight > 0:
            raise AdcError(f"{path}.train_up: the up path gets gradients only from the output term; "
                           "set output_weight > 0 (or train_up: false)")
        if self.init_crops < 1:
            raise AdcError(f"{path}.init_crops: expected a positive number of crops, got {self.init_crops}")
        if any(m < 1 for m in self.lr_milestones) or list(self.lr_milestones) != sorted(self.lr_milestones):
            raise AdcError(f"{path}.lr_milestones: expected increasing positive steps, got {self.lr_milestones}")
        if self.lora_rank < 1:
            raise AdcError(f"{path}.lora_rank: expected a positive integer, got {self.lora_rank}")
        if self.prompt == "fixed" and not self.prompt_text:
            raise AdcError(f"{path}.prompt_text: prompt 'fixed' needs the text to embed")
        if self.optimizer == "adam8bit":
            try:
                import bitsandbytes  # noqa: F401
            except Exception as exc:  # ImportError, or a build without this platform's kernels
                raise AdcError(f"{path}.optimizer: adam8bit needs bitsandbytes ({type(exc).__name__}); "
                               "pip install bitsandbytes, or use adam") from None
        from ..data import DegradationConfig

        DegradationConfig.from_dict(self.degradation, f"{path}.degradation")
        self.engine.validate(f"{path}.engine")

    def degradation_config(self):
        from ..data import DegradationConfig

        return DegradationConfig.from_dict({"gt_size": self.crop, **self.degradation}, "distill.degradation")


def build_setup(bundle: DistillBundle, config: DistillConfig, dataset: Dataset) -> TrainSetup:
    """The engine's view of a bundle: optimisers, schedulers, loss terms and the step."""
    student = bundle.student.train()
    if not any(p.requires_grad for p in student.parameters()):
        raise AdcError("distill: the student has no trainable parameters")
    bundle.teacher.eval().requires_grad_(False)
    use_adv = bundle.discriminator is not None and config.adv_weight > 0
    g_params: list = [p for p in student.parameters() if p.requires_grad]
    proj = bundle.projectors if bundle.projectors is not None and len(bundle.projectors.convs) else None
    if proj is not None:  # the student's optimiser, a second group: same lr and schedule
        g_params = [{"params": g_params}, {"params": list(proj.train().parameters())}]
    opt_g = _adam(config.optimizer)(g_params, lr=config.lr_g, betas=config.betas_g)
    trainable = {"student": student, **({"projector": proj} if proj is not None else {})}
    optimizers: dict[str, torch.optim.Optimizer] = {"student": opt_g}
    schedulers = {"student": torch.optim.lr_scheduler.MultiStepLR(opt_g, list(config.lr_milestones), config.lr_gamma)}
    losses = {"student": [p.name for p in bundle.pairs] + (["adv_g"] if use_adv else [])}
    frozen = {"teacher": bundle.teacher, **bundle.frozen}
    if use_adv:
        disc = bundle.discriminator.train()
        d_params = [p for p in disc.parameters() if p.requires_grad]
        if not d_params:
            raise AdcError("distill: the discriminator has no trainable parameters")
        trainable["discriminator"] = disc
        optimizers["discriminator"] = _adam(config.optimizer)(d_params, lr=config.lr_d, betas=config.betas_d)
        losses["discriminator"] = ["d_real", "d_fake"]
        frozen["real"] = bundle.real.eval().requires_grad_(False)
    weights = {p.name: p.weight for p in bundle.pairs} | {"adv_g": config.adv_weight}
    loss_fns = {p.name: p.loss_fn() for p in bundle.pairs}
    adv_on = bundle.adv_on if bundle.adv_on is not None else bundle.pairs[0].student
    s_names = [p.student for p in bundle.pairs if isinstance(p.student, str)] + ([adv_on] if isinstance(adv_on, str) else [])
    t_names = [p.teacher for p in bundle.pairs if isinstance(p.teacher, str)]

    def project(ctx: StepContext, s_feats: dict, t_out: Any, t_cap: Mapping) -> dict[str, torch.Tensor]:
        """The projected student features; on a fresh run's first micro-batch the projectors are first
        fitted to it (a resumed run never computes step 1: it loads the fitted, trained ones)."""
        names = list(proj.convs)
        if ctx.step == 1 and ctx.micro == 0:
            pairs = {p.name: p for p in bundle.pairs}
            t_feats = {n: upcast(pick(pairs[n].teacher, t_out, t_cap, "teacher")).to(s_feats[n].dtype) for n in names}
            reduce = (lambda x: ctx.accelerator.reduce(x, "sum")) if ctx.accelerator.num_processes > 1 else None
            fit = ctx.unwrap("projector").fit({n: s_feats[n].detach() for n in names}, t_feats, reduce)
            if ctx.accelerator.is_main_process:
                get_logger(__name__).info("[distill] block projectors fitted by least squares on the first batch, "
                                          "relative residual: " + ", ".join(f"{n} {a:.3f} -> {b:.3f}"
                                                                            for n, (a, b) in fit.items()))
        return {n: upcast(x) for n, x in ctx.model("projector")({n: s_feats[n] for n in names}).items()}

    def step_fn(ctx: StepContext, batch: dict) -> None:
        with torch.no_grad():
            inputs = bundle.make_inputs(batch, ctx.device)
        gan_on = use_adv and ctx.step >= config.adv_start
        with contextlib.ExitStack() as d_frozen:
            if gan_on:
                # D frozen through the student's backward too: a checkpointed D recomputes its blocks
                # in backward, and must save the same tensors as in its (frozen) forward
                d_frozen.enter_context(frozen_parameters(ctx.unwrap("discriminator")))
            with ctx.autocast():
                with torch.no_grad(), capture(bundle.teacher, t_names) as t_cap:
                    t_out = call(bundle.teacher, inputs["teacher"])
                with capture(ctx.unwrap("student"), s_names) as s_cap:
                    s_out = call(ctx.model("student"), inputs["student"])
                s_feats = {p.name: upcast(pick(p.student, s_out, s_cap, "student")) for p in bundle.pairs}
                if proj is not None:
                    s_feats.update(project(ctx, s_feats, t_out, t_cap))
                terms = {}
                for p in bundle.pairs:
                    s = s_feats[p.name]
                    t = upcast(pick(p.teacher, t_out, t_cap, "teacher")).to(s.dtype)
                    if s.shape != t.shape:
                        raise AdcError(f"feature pair {p.name!r}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
                    terms[p.name] = loss_fns[p.name](s, t)
                fake = pick(adv_on, s_out, s_cap, "student") if use_adv else None
                if gan_on:  # before adv_start the term is not logged (missing in metrics.csv, not 0)
                    d = ctx.unwrap("discriminator")
                    terms["adv_g"] = generator_adv_loss(upcast(call_disc(d, fake, inputs)), config.adv_loss)
            ctx.optimize("student", terms, weights)
        if gan_on:
            with ctx.autocast():
                with torch.no_grad():
                    real = call(ctx.frozen("real"), inputs["real"])
                both = torch.cat([real.to(fake.dtype), fake.detach()])
                logits = upcast(call_disc(ctx.model("discriminator"), both, inputs, repeat=2))
                l_real, l_fake = logits.chunk(2)
                if config.adv_loss == "hinge":
                    d_terms = {"d_real": F.relu(1 - l_real).mean(), "d_fake": F.relu(1 + l_fake).mean()}
                else:
                    d_terms = {"d_real": F.softplus(-l_real).mean(), "d_fake": F.softplus(l_fake).mean()}
            ctx.optimize("discriminator", d_terms)

    markers = {f"lr x{config.lr_gamma:g}": list(config.lr_milestones)}
    if use_adv:
        markers = {"discriminator starts": [config.adv_start], **markers}
    return TrainSetup(name="distill", trainable=trainable, optimizers=optimizers, losses=losses, step_fn=step_fn,
                      dataset=dataset, schedulers=schedulers, frozen=frozen, markers=markers)


def _adam(kind: str):
    if kind == "adam8bit":
        import bitsandbytes as bnb

        return bnb.optim.Adam8bit
    return torch.optim.Adam


def call_disc(disc: nn.Module, x: torch.Tensor, inputs: Mapping[str, Any], repeat: int = 1) -> torch.Tensor:
    """D(x, **inputs["disc"]); batch-shaped keyword tensors are repeated for a [real; fake] batch."""
    kwargs = dict(inputs.get("disc") or {})
    if repeat > 1:
        kwargs = {k: torch.cat([v] * repeat) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    return disc(x, **kwargs)


def run_stage(bundle: DistillBundle, config: DistillConfig, run_dir: str | Path, dataset: Dataset | None = None,
              log=None, write_student: bool = True) -> dict[str, Any]:
    """Distil; write the student (``student.safetensors`` + the bundle's own exports) in ``run_dir``.

    ``dataset`` overrides ``config.train_hr`` (items: HR 3xHxW in [0, 1]). Every process of an
    ``accelerate launch`` calls this; the main one writes the files. ``write_student=False``:
    the trained student is only returned (``artifacts["model"]``; the runner saves it once). Block
    projectors (``block_weight``) are a training aid: in the checkpoints, never in the student's files.
    """
    run_dir = Path(run_dir)
    log = log or get_logger(__name__).info
    config.validate("distill")
    engine = config.engine.with_defaults(**DistillConfig.ENGINE_DEFAULTS)
    if dataset is None:
        dataset = hr_crops(list(config.train_hr), config.crop, config.hflip, engine.seed)
    setup = build_setup(bundle, config, dataset)
    state = process_state(engine)
    is_main = state.is_main_process
    if is_main:
        for note in bundle.notes:
            log(f"[distill] {note}")
    result = train(setup, engine, run_dir, log=log)
    student = result.models["student"]
    artifacts: dict[str, Any] = {
        "metrics": str(run_dir / "metrics.csv"),
        "loss_curve": str(run_dir / "loss_curve.png"),
        "summary": str(run_dir / "summary.json"),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "steps": result.step,
        "steps_per_s": result.summary["steps_per_s"],
        "peak_memory_mib": result.summary["peak_memory_mib"],
    }
    if is_main and write_student:
        artifacts["student"] = str(run_dir / "student.safetensors")
        save_safetensors({k: v.detach().cpu() for k, v in student.state_dict().items()}, artifacts["student"],
                         metadata={"stage": "distill"})
    if is_main:
        if "discriminator" in result.models:
            d_state = {k: v.detach().cpu() for k, v in result.models["discriminator"].named_parameters() if v.requires_grad}
            save_safetensors(d_state, run_dir / "discriminator_trainable.safetensors", metadata={"stage": "distill"})
            artifacts["discriminator"] = str(run_dir / "discriminator_trainable.safetensors")
        if bundle.export is not None:
            artifacts.update(bundle.export(student, run_dir))
        atomic_write_json(run_dir / "config.json", to_dict(config))
    state.wait_for_everyone()
    artifacts["model"] = student
    return artifacts


# --------------------------------------------------------------------------------------------
# The AdcSR instance (any family: the family supplies its side, compress.families.DistillParts)
# --------------------------------------------------------------------------------------------
class UNetDiscriminator(nn.Module):
    """AdcSR's D: an SD UNet with a wider ``conv_in`` and LoRA, at a fixed timestep, text-conditioned.

    Input: features (B, C, h, w); output: the UNet's raw (B, out, h, w) prediction, used as
    per-location logits.
    """

    def __init__(self, unet: nn.Module, timestep: int = 999):
        super().__init__()
        self.unet = unet
        self.timestep = int(timestep)

    def forward(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.timestep, device=x.device, dtype=torch.long)
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states.to(x.dtype)).sample


def make_unet_discriminator(unet: nn.Module, in_channels: int, rank: int = 4, timestep: int = 999,
                            seed: int = 0, targets: Callable[[nn.Module], dict[str, list[str]]] | None = None,
                            copy_unet: bool = True) -> UNetDiscriminator:
    """Copy ``unet`` (a plain SD UNet), widen its ``conv_in`` to ``in_channels`` and add LoRA.

    The new ``conv_in`` weight is the old one repeated ``in_channels / old_in`` times along the
    input axis and divided by that factor (so a feature map of repeated latents gives the old
    response); the bias is kept. LoRA: rank ``rank``, gaussian init, one adapter per entry of
    ``targets(unet)`` (default: the three-adapter grep AdcSR uses, ``conv_in`` in the encoder
    adapter). Trainable: LoRA + ``conv_in``, nothing else. ``copy_unet=False``: ``unet`` itself
    becomes D (no second copy of a 3.5 GB UNet in memory; pass one nobody else uses).
    """
    from peft import LoraConfig

    from ..zoo.lora import lora_layers, sd_unet_lora_targets

    if lora_layers(unet):
        raise AdcError("make_unet_discriminator: pass the plain SD UNet (this one carries LoRA layers; "
                       "AdcSR's D starts from the base model, not from the teacher)")
    d = copy.deepcopy(unet) if copy_unet else unet
    old = d.conv_in
    if in_channels % old.in_channels:
        raise AdcError(f"discriminator conv_in: {in_channels} feature channels are not a multiple of the "
                       f"UNet's {old.in_channels} input channels")
    rep = in_channels // old.in_channels
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight.repeat(1, rep, 1, 1) / rep)
        new.bias.copy_(old.bias)
    d.conv_in = new
    if hasattr(d, "register_to_config"):
        d.register_to_config(in_channels=in_channels)
    adapters = (targets or sd_unet_lora_targets)(d)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # several adapters is the point
        torch.manual_seed(seed)
        for name, modules in adapters.items():
            if modules:
                d.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=modules),
                              adapter_name=name)
    d.set_adapter([n for n, m in adapters.items() if m])
    d.requires_grad_(False)
    for n, p in d.named_parameters():
        if "lora_" in n or n.startswith("conv_in."):
            p.requires_grad_(True)
    return UNetDiscriminator(d, timestep)


class AdcSRStudentFeatures(nn.Module):
    """The trained part of AdcSR (``Net`` in the official code): LR [-1,1] -> decoder mid-block
    features. Holds the whole model so the export has the (frozen) up path too."""

    def __init__(self, adcsr: nn.Module):
        super().__init__()
        self.adcsr = adcsr
        adcsr.up.requires_grad_(False)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.adcsr.features(lr)


class AdcSRStudentOutput(AdcSRStudentFeatures):
    """Output-level distillation's student: LR [-1,1] -> SR [-1,1] (the whole forward; the mid-block
    features are still there for the feature term, by a hook on ``adcsr.mid_block``). ``color_fix``:
    the output after the student's colour fix (else before it)."""

    def __init__(self, adcsr: nn.Module, color_fix: bool = False):
        super().__init__(adcsr)
        self.color_fix = color_fix

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        from ..zoo.adcsr import match_color

        sr = self.adcsr.up(self.adcsr.features(lr))
        return match_color(sr, lr) if self.color_fix else sr


class DecoderFeatures(nn.Module):
    """Frozen: the decoder's input (``post_quant_conv`` output) -> stage-1 decoder ``conv_in`` -> ``mid_block``."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.conv_in = decoder.conv_in
        self.mid_block = decoder.mid_block

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mid_block(self.conv_in(z), None)


class TeacherFeatures(nn.Module):
    """Frozen teacher path: LR [-1,1] -> the teacher's one-step latent -> decoder input -> decoder features."""

    def __init__(self, teacher: nn.Module, latent: Callable, decode_input: nn.Module, decoder: DecoderFeatures):
        super().__init__()
        self.teacher = teacher
        self.decode_input = decode_input
        self.decoder = decoder
        self._latent = latent

    def latent(self, lr: torch.Tensor, prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self._latent(lr, prompt_embeds)

    def forward(self, lr: torch.Tensor, prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self.decode_input(self.latent(lr, prompt_embeds)))


class TeacherOutput(TeacherFeatures):
    """Frozen teacher path to both targets from one teacher pass: LR [-1,1] -> one-step latent ->
    decoder input -> (stage-1 ``conv_in`` + ``mid_block``: the features, hooked as ``decoder.mid_block``)
    and (the teacher's own full decoder, clamped: its SR image, the output). ``color_fix``: the SR
    after the colour fix to the LR (as the student's ``color_fix`` output)."""

    def __init__(self, teacher: nn.Module, latent: Callable, decode_input: nn.Module, decoder: DecoderFeatures,
                 full_decoder: nn.Module, color_fix: bool = False):
        super().__init__(teacher, latent, decode_input, decoder)
        self.full_decoder = full_decoder
        self.color_fix = color_fix

    def forward(self, lr: torch.Tensor, prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
        from ..zoo.adcsr import match_color

        h = self.decode_input(self.latent(lr, prompt_embeds))
        self.decoder(h)  # the feature target, taken by the hook on decoder.mid_block
        sr = self.full_decoder(h).clamp(-1, 1)
        return match_color(sr, lr.to(sr.dtype)) if self.color_fix else sr


class RealFeatures(nn.Module):
    """Frozen real path for D: HR [-1,1] -> the family's ground-truth latent -> decoder features."""

    def __init__(self, real_latent: nn.Module, decoder: DecoderFeatures):
        super().__init__()
        self.real_latent = real_latent
        self.decoder = decoder

    def forward(self, hr: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.real_latent(hr))


def degrade_items(degradation, hr: torch.Tensor, batch: Mapping[str, Any], seed: int) -> torch.Tensor:
    """LR for each HR item from its own generator (seeded by epoch and dataset index): the LR of an
    item never depends on its batch neighbours, the process count or a resume."""
    epochs, indices = batch["epoch"].tolist(), batch["index"].tolist()
    out = []
    for i in range(hr.shape[0]):
        g = torch.Generator().manual_seed(item_seed(seed, epochs[i], indices[i], tag=1))
        out.append(degradation(hr[i:i + 1], generator=g))
    return torch.cat(out)


def default_block_layers(unet: nn.Module) -> list[str]:
    """Every down block, the mid block and every up block of an SD-structured UNet, in forward order."""
    return ([f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
            + (["mid_block"] if getattr(unet, "mid_block", None) is not None else [])
            + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))])


def block_pair_name(layer: str) -> str:
    """down_blocks.0 -> blk_down0, mid_block -> blk_mid (a metrics column and a ModuleDict key: no dots)."""
    short = layer.replace("down_blocks.", "down").replace("up_blocks.", "up").replace("mid_block", "mid")
    return "blk_" + short.replace(".", "_")


@torch.no_grad()
def block_pairs(student: nn.Module, parts, config: DistillConfig, teacher_denoiser: str = "unet"
                ) -> tuple[list[FeaturePair], dict[str, tuple[int, int]]]:
    """Block-wise distillation's pairs (student ``adcsr.unet.<block>`` vs ``teacher.<denoiser>.<block>``,
    normalised L1, each weighted ``block_weight / blocks``) and each pair's (student, teacher) width.

    The widths and spatial sizes come from one probe forward of both UNets on a small fixed LR (no
    gradients, eval mode, the global RNG untouched): structure alone does not say a block's output
    width once channel pruning has rewritten its convs.
    """
    if parts.teacher is None:
        raise AdcError("distill.block_weight: this family's distillation parts name no teacher module to take "
                       "UNet blocks from")
    try:
        parts.teacher.get_submodule(teacher_denoiser)
    except AttributeError:
        raise AdcError(f"distill.block_weight: the teacher has no UNet at {teacher_denoiser!r}") from None
    layers = list(config.block_layers) or default_block_layers(student.unet)
    t_names = [f"{teacher_denoiser}.{layer}" for layer in layers]
    for layer, t_name in zip(layers, t_names):
        for root, name, side in ((student.unet, layer, "student UNet"), (parts.teacher, t_name, "teacher")):
            try:
                root.get_submodule(name)
            except AttributeError:
                raise AdcError(f"distill.block_layers: no block {layer!r} in the {side}") from None
    side = student.config.pad_multiple
    lr = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    s_ref, t_ref = next(student.parameters()), next(parts.teacher.parameters())
    modes = {m: m.training for m in student.modules()}
    student.eval()
    try:
        with capture(student.unet, layers) as s_cap, capture(parts.teacher, t_names) as t_cap:
            student.unet(student.unshuffle(lr.to(s_ref.device, s_ref.dtype)))
            parts.teacher_latent(lr.to(t_ref.device, t_ref.dtype), None)
    finally:
        for m, mode in modes.items():
            m.training = mode
    pairs, widths = [], {}
    for layer, t_name in zip(layers, t_names):
        s, t = s_cap.get(layer), t_cap.get(t_name)
        if s is None or t is None:
            raise AdcError(f"distill.block_layers: block {layer!r} did not run in the "
                           f"{'student' if s is None else 'teacher'} UNet's forward")
        if s.shape[2:] != t.shape[2:]:
            raise AdcError(f"distill.block_layers: block {layer!r} is {tuple(s.shape[2:])} in the student and "
                           f"{tuple(t.shape[2:])} in the teacher (same LR); block-wise distillation needs equal sizes")
        name = block_pair_name(layer)
        widths[name] = (s.shape[1], t.shape[1])
        pairs.append(FeaturePair(f"adcsr.unet.{layer}", f"teacher.{t_name}", "l1_rel",
                                 config.block_weight / len(layers), name))
    return pairs, widths


def feature_distill_bundle(student: nn.Module, decoder: nn.Module, parts, config: DistillConfig,
                           init_student_decoder: bool = True, export_official: bool = True,
                           teacher_decoder: nn.Module | None = None, teacher_denoiser: str = "unet") -> DistillBundle:
    """AdcSR's stage 2 for any family, as a :class:`DistillBundle`.

    ``student``: an :class:`~compress.zoo.adcsr.AdcSR` (pruned UNet initialised by the caller).
    ``decoder``: the stage-1 decoder (frozen here; its ``conv_in`` + ``mid_block`` make the
    targets; with ``init_student_decoder`` its ``mid_block`` and up path are copied into the
    student, as the official ``Net`` is built from a copy of it). ``parts``: the family's
    :class:`~compress.families.DistillParts` (teacher latent, decoder input, real latent, the
    plain UNet D starts from, prompts). ``export_official``: also write AdcSR's
    ``net_params.pkl`` / ``halfDecoder.ckpt`` and ``adcsr.safetensors`` beside the run.

    Options beside AdcSR's objective (off by default, and then the bundle is exactly AdcSR's):
    ``config.output_weight > 0`` adds ``out_l1`` (or ``out_mse``): the student's SR against the
    teacher's SR (``teacher_decoder``: the teacher's full VAE decoder, fed the decoder input of the
    same latent as the feature target; default ``parts.teacher.vae.decoder``). With
    ``output_color_fix`` (the default) and a student that applies its colour fix, the loss is on
    both outputs after that fix (the teacher's SR given the LR's per-channel mean and std the same
    way): the deployed student's output. The fix removes any per-channel gain and offset, and the
    student's raw output carries a large one (before stage 2 on the demo: 14.3 dB against the
    teacher's SR raw, 25.0 dB fixed), so a loss before it spends its gradient on a shift that
    deployment discards. On the demo (250 steps, output_weight 1, train_up, engine seeds 0/1/2, the
    earlier 200-step stage 1) the loss after the fix ended at 27.15/27.05/26.60 dB student vs
    teacher SR (PSNR-Y, six held-out pairs), the loss before it at 24.41/23.80/26.79 dB.
    ``output_color_fix: false``: before the fix. ``config.train_up``: the student's up
    path (up blocks, ``conv_norm_out``, ``conv_out``) trains too (AdcSR keeps it frozen). With the
    output term the discriminator still judges the mid-block features. ``config.unet_out_weight > 0``
    adds ``unet_l1``: the student UNet's output against the teacher's stage-1 ``conv_in`` output.
    ``config.block_weight > 0`` adds one ``blk_*`` term per UNet block (:func:`block_pairs`; the
    teacher's UNet at ``teacher_denoiser`` inside ``parts.teacher``), with a :class:`BlockProjectors`
    for the blocks the student has narrower.
    """
    from ..data import RealESRGANDegradation

    lr_side = config.crop // config.degradation_config().scale
    if lr_side % student.config.pad_multiple:
        raise AdcError(f"distill.crop: {config.crop} gives {lr_side}-pixel LR crops; the AdcSR student needs LR sides "
                       f"divisible by {student.config.pad_multiple} (crop divisible by "
                       f"{student.config.pad_multiple * config.degradation_config().scale})")
    blocks = block_pairs(student, parts, config, teacher_denoiser) if config.block_weight > 0 else None
    if init_student_decoder:
        student.mid_block.load_state_dict(decoder.mid_block.state_dict())
        student.up.load_state_dict({k: v for k, v in decoder.state_dict().items()
                                    if k.split(".")[0] in ("up_blocks", "conv_norm_out", "conv_out")})
    student.requires_grad_(True)
    dtype = next(student.parameters()).dtype  # fp32 normally (autocast does the rest); fp64 in exactness tests
    frozen = {"fp32": dtype, "bf16": torch.bfloat16, "fp16": torch.float16}[config.frozen_dtype]
    feats = DecoderFeatures(copy.deepcopy(decoder)).eval().requires_grad_(False)
    use_out = config.output_weight > 0
    if use_out:
        if teacher_decoder is None:
            teacher_decoder = getattr(getattr(parts.teacher, "vae", None), "decoder", None)
        if teacher_decoder is None:
            raise AdcError("distill.output_weight: output-level distillation needs the teacher's full decoder "
                           "(pass teacher_decoder)")
        teacher_module = TeacherOutput(parts.teacher, parts.teacher_latent, parts.decode_input, feats, teacher_decoder,
                                       config.output_color_fix and bool(getattr(student, "color_fix", False))
                                       ).eval().requires_grad_(False)
    else:
        teacher_module = TeacherFeatures(parts.teacher, parts.teacher_latent, parts.decode_input,
                                         feats).eval().requires_grad_(False)
    if config.frozen_dtype != "fp32":
        teacher_module.to(frozen)
    degradation = RealESRGANDegradation(config.degradation_config())
    use_adv = parts.disc_unet is not None and config.adv_weight > 0
    prompts = parts.prompts(config.prompt, config.prompt_text) if (use_adv or config.prompt == "dape") else None
    disc = real = None
    if use_adv:
        c = student.config.feature_channels
        disc = make_unet_discriminator(parts.disc_unet, c, config.lora_rank, parts.timestep,
                                       seed=config.engine.seed + 2, targets=parts.disc_lora_targets, copy_unet=False)
        real = RealFeatures(parts.real_latent, feats).to(frozen).eval().requires_grad_(False)
    seed = config.engine.seed

    def make_inputs(batch: dict, device: torch.device) -> dict:
        hr01 = batch["data"].float()
        lr01 = degrade_items(degradation, hr01, batch, seed)
        lr, hr = (lr01 * 2 - 1).to(dtype), (hr01 * 2 - 1).to(dtype)
        emb = prompts(lr.to(frozen)) if prompts is not None else None
        teacher_emb = emb.to(frozen) if (emb is not None and config.prompt == "dape") else None  # else its own
        emb = emb.to(dtype) if emb is not None else None
        return {"student": lr, "teacher": {"lr": lr.to(frozen), "prompt_embeds": teacher_emb}, "real": hr.to(frozen),
                "disc": {"encoder_hidden_states": emb} if use_adv else {}, "lr01": lr01}

    def export(trained: nn.Module, run_dir: Path) -> dict[str, str]:
        from ..zoo.adcsr import official_state_dicts

        model = trained.adcsr
        net, half = official_state_dicts(model, {k: v.detach().cpu() for k, v in feats.conv_in.state_dict().items()})
        save_safetensors({k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir / "adcsr.safetensors",
                         metadata={"format": "compress.zoo.adcsr.AdcSR"})
        atomic_torch_save(net, run_dir / "net_params.pkl")
        atomic_torch_save(half, run_dir / "halfDecoder.ckpt")
        return {"adcsr": str(run_dir / "adcsr.safetensors"), "net_params": str(run_dir / "net_params.pkl"),
                "half_decoder": str(run_dir / "halfDecoder.ckpt")}

    fixed = config.output_color_fix and bool(getattr(student, "color_fix", False))
    student_module = AdcSRStudentOutput(student, fixed) if use_out else AdcSRStudentFeatures(student)
    if config.train_up:
        student.up.requires_grad_(True)
    pairs = [FeaturePair("adcsr.mid_block", "decoder.mid_block", config.feature_loss, config.feature_weight, "feat_l1"
                         if config.feature_loss == "l1" else f"feat_{config.feature_loss}")]
    if use_out:
        pairs.append(FeaturePair("", "", config.output_loss, config.output_weight, f"out_{config.output_loss}"))
    if config.unet_out_weight > 0:
        pairs.append(FeaturePair("adcsr.unet", "decoder.conv_in", config.feature_loss, config.unet_out_weight,
                                 f"unet_{config.feature_loss}"))
    projectors = None
    if blocks is not None:
        pairs += blocks[0]
        with torch.random.fork_rng(devices=[]):  # built on the CPU from its own seed: the global RNG is untouched
            torch.manual_seed(seed + 3)
            projectors = BlockProjectors(blocks[1], dtype=dtype)  # fitted on the first batch anyway
        projectors.to(next(student.parameters()).device)
    return DistillBundle(
        student=student_module, teacher=teacher_module, pairs=pairs,
        make_inputs=make_inputs, discriminator=disc, real=real, adv_on="adcsr.mid_block" if use_out else "",
        export=export if export_official else None, notes=list(parts.notes), frozen=dict(parts.frozen),
        projectors=projectors)


__all__ = ["FeaturePair", "DistillBundle", "DistillConfig", "build_setup", "run_stage", "capture", "pick",
           "UNetDiscriminator", "make_unet_discriminator", "AdcSRStudentFeatures", "AdcSRStudentOutput",
           "TeacherFeatures", "TeacherOutput", "BlockProjectors", "block_pairs", "default_block_layers",
           "RealFeatures", "DecoderFeatures", "degrade_items", "feature_distill_bundle", "LOSSES"]
