"""Stage 1: pre-train the pruned VAE decoder ("halfDecoder") to decode the frozen teacher latents.

AdcSR never released this stage (company policy, AdcSR issue #4); the paper's framework
figure shows the frozen SD VAE encoder feeding the trainable half-width decoder, and a
third-party summary names L1 + LPIPS + patch adversarial losses (the Latent-Diffusion
autoencoder recipe). So: HR crop -> frozen encoder -> latent *mean* (as stage 2's ground-truth
path uses it, unscaled) -> frozen ``post_quant_conv`` -> trainable decoder -> image, with

    loss_G = l1_weight * |rec - hr| + lpips_weight * LPIPS(rec, hr) + adv_weight * g_loss(D(rec))
    loss_D = d_loss(D(hr), D(rec.detach()))            (from ``disc_start`` on)

LPIPS only when the ``lpips`` package and its backbone weights are already on disk (never
downloaded; otherwise skipped with one notice). D is :class:`PatchDiscriminator`.

``keep_best`` (on by default): the stage cannot return a decoder worse than the one it was given.
Before the first step, every ``val_every`` steps and after the last, it measures the decoder's
reconstruction PSNR-Y (the same path: encoder mean -> ``post_quant_conv`` -> decoder) on a fixed
validation set taken from the *training* HR folders (centre crops of the first ``val_images``
files in sorted order; never the eval pairs, which stay out of every training decision), and
keeps the weights with the best score, step 0 included.

Outputs: the decoder in diffusers naming (``decoder.safetensors``) and AdcSR's
``halfDecoder.ckpt`` layout (``{"state_dict": {"decoder.<diffusers name>": tensor}}``), which
``compress.zoo.adcsr.load_official`` and the official ``train.py``/``test.py`` read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ..config import ranged, from_dict, to_dict
from ..errors import AdcError
from ..log import get_logger
from ..io import atomic_torch_save, atomic_write_json, save_safetensors
from .engine import EngineConfig, StepContext, TrainSetup, frozen_parameters, process_state, train, upcast


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclass
class PretrainDecoderConfig:
    """Stage-1 settings. Defaults follow the LDM autoencoder recipe where AdcSR is silent."""

    train_hr: list[Path] = field(default_factory=list)   # HR folders (searched recursively)
    crop: int = ranged(256, 16, 8192)
    hflip: bool = True
    init: Literal["pruned", "scratch"] = "pruned"        # keep the caller's (pruned) weights, or re-initialise
    lr: float = ranged(1e-4, 1e-12, 1.0)
    betas: tuple[float, float] = (0.5, 0.9)
    disc_lr: float = ranged(1e-4, 1e-12, 1.0)
    l1_weight: float = ranged(1.0, 0, 1e6)
    lpips_weight: float = ranged(1.0, 0, 1e6)
    lpips_net: Literal["vgg", "alex"] = "vgg"
    adv_weight: float = ranged(0.5, 0, 1e6)
    adv_loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_start: int = ranged(50_001, 0, 10**9)                              # LDM starts D late: reconstruction first
    disc_width: int = ranged(64, 1, 4096)
    disc_layers: int = ranged(3, 1, 16)
    keep_best: bool = True        # return the weights with the best validation PSNR-Y (step 0 included)
    val_every: int = ranged(50, 1, 10**9)           # validate every N steps (and before the first, after the last)
    val_images: int = ranged(8, 1, 100000)  # centre crops of the first N training HR files (sorted): the validation set
    engine: EngineConfig = field(default_factory=EngineConfig)

    # Unknown for AdcSR (stage 1 is unreleased); [3RD]: 250 K + 250 K steps. Per-GPU batch 4 x 8 GPUs.
    ENGINE_DEFAULTS = {"max_steps": 250_000, "batch_size": 32, "checkpoint_every": 5_000}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, path: str = "pretrain_decoder") -> "PretrainDecoderConfig":
        return from_dict(cls, dict(d or {}), path)

    def validate(self, path: str) -> None:
        if self.crop < 8 or self.crop % 8:
            raise AdcError(f"{path}.crop: expected a positive multiple of 8 (the VAE downsamples x8), got {self.crop}")
        for name in ("lr", "disc_lr"):
            if not getattr(self, name) > 0:
                raise AdcError(f"{path}.{name}: expected a positive learning rate, got {getattr(self, name)}")
        for name in ("l1_weight", "lpips_weight", "adv_weight"):
            if getattr(self, name) < 0:
                raise AdcError(f"{path}.{name}: expected >= 0, got {getattr(self, name)}")
        if self.disc_layers < 1 or self.disc_width < 1:
            raise AdcError(f"{path}.disc_layers/disc_width: expected positive integers")
        if self.val_every < 1 or self.val_images < 1:
            raise AdcError(f"{path}.val_every/val_images: expected positive integers, "
                           f"got {self.val_every}/{self.val_images}")
        self.engine.validate(f"{path}.engine")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / LDM ``NLayerDiscriminator`` layout): image -> per-patch logits.

    GroupNorm replaces BatchNorm so each sample is judged on its own: the result does not depend
    on the batch size or on how a batch is split over processes (and needs no SyncBatchNorm).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3, groups: int = 32):
        super().__init__()

        def norm(c: int) -> nn.GroupNorm:
            g = next(d for d in (groups, 16, 8, 4, 2, 1) if c % d == 0)
            return nn.GroupNorm(g, c)

        body: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for n in range(1, layers + 1):
            out = width * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            body += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), norm(out), nn.LeakyReLU(0.2, True)]
            ch = out
        body.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.body = nn.Sequential(*body)
        for m in self.modules():  # pix2pix init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def generator_adv_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """G's adversarial term: hinge -> -E[D(fake)]; non-saturating -> E[softplus(-D(fake))]."""
    return -logits_fake.mean() if kind == "hinge" else F.softplus(-logits_fake).mean()


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """hinge: E[relu(1-D(real))] + E[relu(1+D(fake))] (x1/2 as LDM); non-saturating:
    E[softplus(-D(real))] + E[softplus(D(fake))] (AdcSR's D loss)."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def reinitialise(module: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter with its layer's default init (``init: scratch``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters") and m is not module:
                m.reset_parameters()
    return module


class LatentFeatures(nn.Module):
    """Frozen: image in [-1, 1] -> VAE encoder latent *mean* (unscaled) -> ``post_quant_conv``.

    The decoder's input in both stages: stage 2 feeds ``post_quant_conv(z)`` to the decoder's
    ``conv_in`` on the teacher and ground-truth paths (AdcSR ``train.py``).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.post_quant_conv(self.vae.encode(image).latent_dist.mean)


@dataclass
class DecoderModels:
    """What stage 1 trains: ``decoder`` (a diffusers ``Decoder``, pruned by the caller) on the
    latents of the frozen teacher ``vae`` (an ``AutoencoderKL``). ``discriminator`` defaults to
    a :class:`PatchDiscriminator` built from the config."""

    vae: nn.Module
    decoder: nn.Module
    discriminator: nn.Module | None = None


# --------------------------------------------------------------------------------------------
# LPIPS (optional, never downloaded)
# --------------------------------------------------------------------------------------------
_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def lpips_missing(net: str = "vgg") -> str | None:
    """Why LPIPS cannot be used here (None: it can): the package, or a weight file not on disk.

    lpips' own linear heads ship inside the package; its backbone comes from torchvision's hub
    cache, which would be downloaded on first use: adc only builds it when the file is there.
    """
    try:
        import lpips
        import torchvision  # noqa: F401
    except Exception as exc:  # ImportError, or a torchvision that does not match torch
        return f"the lpips/torchvision packages are not importable ({type(exc).__name__})"
    head = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / _BACKBONE_FILES[net]
    for f in (head, backbone):
        if not f.is_file():
            return f"{f.name} is not on disk (adc never downloads weights)"
    return None


def load_lpips(net: str = "vgg") -> tuple[nn.Module | None, str]:
    """(LPIPS module, note). None with the reason when it cannot be used (see :func:`lpips_missing`)."""
    why = lpips_missing(net)
    if why is not None:
        return None, f"LPIPS skipped: {why}"
    import lpips

    model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
    return model, f"LPIPS-{net} used"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
class _EpochConcat(ConcatDataset):
    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)


def hr_crops(roots: list[Path], crop: int, hflip: bool, seed: int) -> Dataset:
    """Random HR crops from one or more folders (one item per file, reshuffled each epoch)."""
    from ..data import HRCropDataset

    if not roots:
        raise AdcError("train_hr: no HR folders given (set data.train_hr in the recipe)")
    sets = [HRCropDataset(r, crop=crop, hflip=hflip, seed=seed + i) for i, r in enumerate(roots)]
    return sets[0] if len(sets) == 1 else _EpochConcat(sets)


def centre_crop(img: torch.Tensor, crop: int) -> torch.Tensor:
    """The ``crop`` x ``crop`` centre of a 3xHxW image (reflect-padded first where a side is shorter)."""
    h, w = img.shape[-2:]
    ph, pw = max(0, crop - h), max(0, crop - w)
    if ph or pw:
        img = F.pad(img[None], (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")[0]
        h, w = img.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return img[:, top:top + crop, left:left + crop].contiguous()


def validation_images(roots: list[Path], crop: int, n: int) -> torch.Tensor:
    """Stage 1's validation set: centre crops (``crop``) of the first ``n`` training HR files, in the
    folders' order and each folder's sorted order (deterministic, drawn from the training data only)."""
    from ..data.images import list_images, read_image, to_chw_tensor

    if not roots:
        raise AdcError("train_hr: no HR folders given for the validation set (keep_best)")
    paths = [p for r in roots for p in list_images(r)][:n]
    return torch.stack([centre_crop(to_chw_tensor(read_image(p)), crop) for p in paths])


@torch.no_grad()
def reconstruction_psnr(latents: nn.Module, decoder: nn.Module, hr01: torch.Tensor, batch: int = 4) -> float:
    """Mean PSNR-Y (dB) of ``decoder(latents(hr))`` against ``hr`` (Bx3xHxW in [0, 1]), ``batch`` at a time,
    on the decoder's device and dtype, without autocast."""
    from ..metrics import psnr_y

    p = next(decoder.parameters())
    scores = []
    for chunk in hr01.split(batch):
        x = chunk.to(p.device, p.dtype)
        rec = decoder(latents(x * 2 - 1))
        scores.append(psnr_y(((rec + 1) / 2).clamp(0, 1), x).cpu())
    return float(torch.cat(scores).mean())


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def decoder_state_dict(decoder: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}


def half_decoder_checkpoint(decoder: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """AdcSR's ``halfDecoder.ckpt`` layout: ``{"state_dict": {"decoder.<diffusers name>": tensor}}``."""
    return {"state_dict": {f"decoder.{k}": v for k, v in decoder_state_dict(decoder).items()}}


def build_setup(models: DecoderModels, config: PretrainDecoderConfig, dataset: Dataset,
                lpips_model: nn.Module | None, val_images: torch.Tensor | None = None) -> TrainSetup:
    decoder = models.decoder.train().requires_grad_(True)
    disc = models.discriminator
    if disc is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.engine.seed + 1)
            disc = PatchDiscriminator(3, config.disc_width, config.disc_layers)
        disc.to(next(decoder.parameters()).dtype)
    disc.train().requires_grad_(True)
    latents = LatentFeatures(models.vae.eval().requires_grad_(False))
    frozen: dict[str, nn.Module] = {"latents": latents}
    if lpips_model is not None:
        frozen["lpips"] = lpips_model
    use_adv = config.adv_weight > 0
    opt_g = torch.optim.Adam(decoder.parameters(), lr=config.lr, betas=config.betas)
    trainable = {"decoder": decoder}
    optimizers = {"decoder": opt_g}
    losses = {"decoder": ["l1"] + (["lpips"] if lpips_model is not None else []) + (["adv_g"] if use_adv else [])}
    if use_adv:
        trainable["discriminator"] = disc
        optimizers["discriminator"] = torch.optim.Adam(disc.parameters(), lr=config.disc_lr, betas=config.betas)
        losses["discriminator"] = ["d_loss"]
    weights = {"l1": config.l1_weight, "lpips": config.lpips_weight, "adv_g": config.adv_weight}
    dtype = next(decoder.parameters()).dtype  # fp32 normally (autocast does the rest); fp64 in exactness tests

    def step_fn(ctx: StepContext, batch: dict) -> None:
        hr = batch["data"].to(dtype) * 2 - 1
        gan_on = use_adv and ctx.step >= config.disc_start
        with ctx.autocast():
            h = ctx.frozen("latents")(hr)
            rec = upcast(ctx.model("decoder")(h))
            terms = {"l1": (rec - hr).abs().mean()}
            if lpips_model is not None:
                terms["lpips"] = ctx.frozen("lpips")(rec, hr).mean()
            if gan_on:  # before disc_start the term is not logged (missing in metrics.csv, not 0)
                with frozen_parameters(ctx.unwrap("discriminator")):
                    terms["adv_g"] = generator_adv_loss(upcast(ctx.unwrap("discriminator")(rec)), config.adv_loss)
        ctx.optimize("decoder", terms, weights)
        if gan_on:
            with ctx.autocast():
                logits = upcast(ctx.model("discriminator")(torch.cat([hr, rec.detach()])))
                real, fake = logits.chunk(2)
                d = discriminator_loss(real, fake, config.adv_loss)
            ctx.optimize("discriminator", {"d_loss": d})

    def validate(ctx: StepContext) -> float:
        return reconstruction_psnr(ctx.frozen("latents"), ctx.unwrap("decoder"), val_images)

    return TrainSetup(name="pretrain_decoder", trainable=trainable, optimizers=optimizers, losses=losses,
                      step_fn=step_fn, dataset=dataset, frozen=frozen,
                      markers={"discriminator starts": [config.disc_start]} if use_adv else {},
                      validate=validate if val_images is not None else None, val_every=config.val_every,
                      val_name="val_psnr_y",
                      keep_best=("decoder",) if val_images is not None and config.keep_best else ())


def run_stage(models: DecoderModels, config: PretrainDecoderConfig, run_dir: str | Path,
              dataset: Dataset | None = None, log=None, write_decoder: bool = True,
              val_images: torch.Tensor | None = None) -> dict[str, Any]:
    """Train the decoder; write ``decoder.safetensors`` and ``halfDecoder.ckpt`` in ``run_dir``.

    ``dataset`` overrides ``config.train_hr`` (items: 3xHxW in [0, 1]); ``val_images`` (Bx3xHxW in
    [0, 1]) overrides the validation set drawn from ``config.train_hr`` (:func:`validation_images`).
    With ``keep_best`` and neither, the stage refuses to run. Returns the artifact paths, the
    training summary and the validation record (``val_psnr_y``: start, best, last; ``best_step``).
    Under ``accelerate launch`` every process calls this;
    only the main one writes the exports. ``write_decoder=False``: the trained decoder is only
    returned (``artifacts["model"]``; the runner saves the student once).
    """
    run_dir = Path(run_dir)
    log = log or get_logger(__name__).info
    config.validate("pretrain_decoder")
    if not hasattr(models.decoder, "mid_block") or not hasattr(models.decoder, "conv_in"):
        raise AdcError("pretrain_decoder: models.decoder must be a diffusers Decoder (conv_in, mid_block, up_blocks, ...)")
    if config.init == "scratch":
        reinitialise(models.decoder, config.engine.seed)
    if dataset is None:
        dataset = hr_crops(list(config.train_hr), config.crop, config.hflip, config.engine.seed)
    lpips_model, lpips_note = (None, "LPIPS off (lpips_weight = 0)")
    if config.lpips_weight > 0:
        lpips_model, lpips_note = load_lpips(config.lpips_net)
    if val_images is None and (config.keep_best or config.train_hr):  # measured whenever there is data for it
        val_images = validation_images(list(config.train_hr), config.crop, config.val_images)
    setup = build_setup(models, config, dataset, lpips_model, val_images)
    state = process_state(config.engine)
    is_main = state.is_main_process
    if is_main:
        log(f"[pretrain_decoder] {lpips_note}")
    result = train(setup, config.engine.with_defaults(**PretrainDecoderConfig.ENGINE_DEFAULTS), run_dir, log=log)
    decoder = result.models["decoder"]
    artifacts: dict[str, Any] = {
        "metrics": str(run_dir / "metrics.csv"),
        "loss_curve": str(run_dir / "loss_curve.png"),
        "summary": str(run_dir / "summary.json"),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "steps": result.step,
        "lpips": lpips_note,
        "steps_per_s": result.summary["steps_per_s"],
        "peak_memory_mib": result.summary["peak_memory_mib"],
    }
    val = result.summary.get("validation")
    if val is not None:
        artifacts["best_step"] = val["best_step"]
        artifacts["val_psnr_y"] = {"images": len(val_images), "crop": int(val_images.shape[-1]),
                                   "start": round(val["start"], 4), "best": round(val["best"], 4),
                                   "last": round(val["last"], 4), "start_step": val["start_step"],
                                   "last_step": val["last_step"], "keep_best": config.keep_best,
                                   "restored": val["restored"]}
        if is_main:
            log(f"[pretrain_decoder] validation PSNR-Y on {len(val_images)} training crops: {val['start']:.2f} dB "
                f"at step {val['start_step']} -> best {val['best']:.2f} dB at step {val['best_step']} "
                f"(last {val['last']:.2f} dB at step {val['last_step']})"
                + ("" if config.keep_best else "; keep_best off: the last weights are returned"))
    if is_main and write_decoder:
        artifacts["decoder"] = str(run_dir / "decoder.safetensors")
        artifacts["half_decoder"] = str(run_dir / "halfDecoder.ckpt")
        save_safetensors(decoder_state_dict(decoder), artifacts["decoder"],
                         metadata={"format": "diffusers Decoder", "stage": "pretrain_decoder"})
        atomic_torch_save(half_decoder_checkpoint(decoder), artifacts["half_decoder"])
    if is_main:
        atomic_write_json(run_dir / "config.json", to_dict(config))
    state.wait_for_everyone()
    artifacts["model"] = decoder
    return artifacts


__all__ = ["PretrainDecoderConfig", "DecoderModels", "PatchDiscriminator", "LatentFeatures", "run_stage",
           "build_setup", "load_lpips", "half_decoder_checkpoint", "decoder_state_dict", "generator_adv_loss",
           "discriminator_loss", "reinitialise", "hr_crops", "validation_images", "reconstruction_psnr", "centre_crop"]
