"""``pretrain_decoder`` (stage 1) and ``distill`` (stage 2): recovery on the recover engine.

Both wrap :mod:`compress.recover` and hand on a new student: stage 1 replaces the pruned
decoder by the trained one (the student's mid-block and up path start from it, as AdcSR builds
its ``Net`` from ``halfDecoder.ckpt``); stage 2 trains the student's UNet and mid-block against
the family's teacher. The family supplies the ground-truth VAE (stage 1 latents, stage 2's real
path) and its side of distillation (:meth:`compress.families.ModelFamily.distill_parts`). Each
stage checks what it bought, before -> after, on the first eval pairs (``data.eval_limit``,
default 4: the check runs them as one batch, at full size) with float outputs; the run's quality
numbers are the evaluate stage's, on all its pairs, and the report says which is which.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdcError
from ..recover.decoder_pretrain import PretrainDecoderConfig
from ..recover.distill import DistillConfig

__all__ = ["PretrainDecoderConfig", "DistillConfig", "run_pretrain_decoder", "run_distill"]
MEASURE_DEFAULT = 4


def _check_shared(recipe, config, path: str) -> None:
    """Data and its degradation are the recipe's (``data.*``): one source for every training stage."""
    if config.train_hr:
        raise AdcError(f"{path}.train_hr: set data.train_hr instead (one list of HR folders for every stage)")
    if getattr(config, "degradation", None):
        raise AdcError(f"{path}.degradation: set data.degradation instead (one degradation for every stage)")


def check_pretrain_decoder(recipe, config: PretrainDecoderConfig, path: str) -> None:
    _check_shared(recipe, config, path)


def check_distill(recipe, config: DistillConfig, path: str) -> None:
    _check_shared(recipe, config, path)
    if config.prompt == "dape" and recipe.models.size == "tiny":
        raise AdcError(f"{path}.prompt: 'dape' needs the full-size teacher's tagger weights; a tiny teacher uses "
                       "prompt: empty")


def _student_needs(bundle) -> list[str]:
    """A structure-only student (no weights at ``remove``) cannot be trained: what it lacked."""
    remove = bundle.artifacts.get("remove", {})
    if not remove.get("structure_only"):
        return []
    init = bundle.recipe.stage("remove").config.init if bundle.recipe.stage("remove") else "base"
    return bundle.family.init_needs(init, bundle.weights) or [f"weights for the student (remove.init: {init})"]


def _data_needs(bundle) -> list[str]:
    return [] if bundle.recipe.data.train_hr else ["data.train_hr = HR image folders (LSDIR in the paper)"]


def _eval_images(bundle, key: str) -> torch.Tensor | None:
    from ..data import PairedFolderDataset

    data = bundle.recipe.data
    if not (data.eval_lr and data.eval_hr):
        return None
    pairs = PairedFolderDataset(data.eval_lr, data.eval_hr, scale=bundle.recipe.task.scale)
    n = min(data.eval_limit or MEASURE_DEFAULT, len(pairs))
    return torch.stack([pairs[i][key] for i in range(n)])


def _real_vae(bundle) -> nn.Module:
    return bundle.cached("real_vae", lambda: bundle.family.real_vae(bundle.size, bundle.weights, bundle.teacher)
                         .eval().requires_grad_(False))


def _with_data(bundle, config):
    extra = {"degradation": bundle.recipe.data.degradation.to_dict()} if hasattr(config, "degradation") else {}
    return replace(config, train_hr=list(bundle.recipe.data.train_hr), **extra)


# --------------------------------------------------------------------------------------------
# stage 1
# --------------------------------------------------------------------------------------------
def run_pretrain_decoder_needs(bundle, config: PretrainDecoderConfig) -> list[str]:
    needs = bundle.family.real_vae_needs(bundle.weights) if bundle.size == "full" else []
    if config.lpips_weight > 0:  # asked for: never silently trained without it
        from ..recover.decoder_pretrain import lpips_missing

        why = lpips_missing(config.lpips_net)
        if why is not None:
            needs.append(f"stages.pretrain_decoder.lpips_weight {config.lpips_weight} needs LPIPS: {why} "
                         "(install lpips with its backbone weights, or set lpips_weight: 0)")
    return needs + _student_needs(bundle) + _data_needs(bundle)


@torch.no_grad()
def _decoder_input(vae: nn.Module, hr01: torch.Tensor) -> torch.Tensor:
    """HR in [0, 1] -> the frozen encoder's latent mean -> ``post_quant_conv``: what any decoder decodes
    (stage 1's own input path, :class:`~compress.recover.decoder_pretrain.LatentFeatures`)."""
    from ..recover.decoder_pretrain import LatentFeatures

    return LatentFeatures(vae)(hr01 * 2 - 1)


@torch.no_grad()
def _reconstruction_psnr(vae: nn.Module, decoder: nn.Module, hr01: torch.Tensor,
                         h: torch.Tensor | None = None) -> float:
    """Mean PSNR-Y of ``decoder``'s reconstruction of ``hr01`` (``h``: :func:`_decoder_input`, if computed)."""
    from ..metrics import psnr_y

    rec = decoder(_decoder_input(vae, hr01) if h is None else h)
    return float(psnr_y(((rec + 1) / 2).clamp(0, 1), hr01).mean())


def run_pretrain_decoder(bundle, config: PretrainDecoderConfig, stage_dir: Path) -> dict[str, Any]:
    from ..recover.decoder_pretrain import DecoderModels, run_stage

    state = bundle.student_state()
    decoder = state.decoder
    vae = _real_vae(bundle)
    held_out = _eval_images(bundle, "hr")
    h = _decoder_input(vae, held_out) if held_out is not None else None  # encoded once, decoded three times
    # the ceiling of any decoder on these images: the teacher's VAE with its own, full decoder
    ceiling = _reconstruction_psnr(vae, vae.decoder, held_out, h) if held_out is not None else None
    before = _reconstruction_psnr(vae, decoder, held_out, h) if held_out is not None else None
    artifacts = run_stage(DecoderModels(vae=vae, decoder=decoder), _with_data(bundle, config), stage_dir,
                          write_decoder=False)
    decoder = artifacts.pop("model").cpu().eval()
    after = _reconstruction_psnr(vae.cpu(), decoder, held_out, h.cpu()) if held_out is not None else None
    bundle.set_student(state.recompose(decoder=decoder))
    if before is not None:
        artifacts["measured"] = {
            "teacher's VAE reconstruction of HR with its full decoder, PSNR-Y (dB): the ceiling": f"{ceiling:.2f}",
            "decoder's reconstruction of HR through the VAE, PSNR-Y (dB)": f"{before:.2f} -> {after:.2f}"}
        artifacts["measured_images"] = len(held_out)
        artifacts["measured_values"] = {"teacher_vae_psnr_y": ceiling, "decoder_psnr_y_before": before,
                                        "decoder_psnr_y_after": after, "images": len(held_out)}
    return _relative(bundle, artifacts)


def _relative(bundle, artifacts: dict[str, Any]) -> dict[str, Any]:
    """Paths inside the run directory made relative to it (a run directory can be moved)."""
    import os

    root = bundle.run_dir.resolve()
    out = {}
    for k, v in artifacts.items():
        if isinstance(v, str) and os.sep in v and Path(v).resolve().is_relative_to(root):
            v = os.path.relpath(Path(v).resolve(), root)
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# stage 2
# --------------------------------------------------------------------------------------------
def run_distill_needs(bundle, config: DistillConfig) -> list[str]:
    needs = list(bundle.teacher_needs())
    if bundle.size == "full":
        needs += [n for n in bundle.family.distill_needs(bundle.weights, config.prompt) if n not in needs]
        if config.adv_weight > 0:
            needs += [n for n in bundle.family.real_vae_needs(bundle.weights) if n not in needs]
    return needs + _student_needs(bundle) + _data_needs(bundle)


@torch.no_grad()
def _teacher_targets(teacher_feats, teacher_sr, lr01: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher's features and SR on the eval LR images, computed once for both measurements."""
    lr = (lr01 * 2 - 1).to(next(teacher_feats.parameters()).device)
    return {"lr": lr, "features": teacher_feats(lr), "sr": ((teacher_sr(lr) + 1) / 2).clamp(0, 1)}


@torch.no_grad()
def _distill_measure(student, targets: dict[str, torch.Tensor], hr01: torch.Tensor) -> dict[str, float]:
    from ..metrics import psnr_y

    lr = targets["lr"]
    student.to(lr.device)
    sr_s = ((student(lr) + 1) / 2).clamp(0, 1)
    return {"feature_l1": float((student.features(lr) - targets["features"]).abs().mean()),
            "psnr_student_vs_teacher": float(psnr_y(sr_s, targets["sr"]).mean()),
            "psnr_student_vs_hr": float(psnr_y(sr_s, hr01.to(lr.device)).mean())}


def run_distill(bundle, config: DistillConfig, stage_dir: Path) -> dict[str, Any]:
    import copy

    from ..recover.distill import DecoderFeatures, TeacherFeatures, feature_distill_bundle, run_stage

    state = bundle.student_state()
    student, decoder = state.model, state.decoder
    teacher = bundle.teacher()
    parts = bundle.family.distill_parts(teacher, bundle.size, bundle.weights, bundle.options)
    if config.adv_weight == 0:
        parts.disc_unet = None
    config = _with_data(bundle, config)
    lr_held = _eval_images(bundle, "lr")
    feats = TeacherFeatures(teacher, parts.teacher_latent, parts.decode_input,
                            DecoderFeatures(copy.deepcopy(decoder).to(bundle.device))).eval()
    sr_teacher = lambda lr: bundle.family.teacher_forward(teacher, lr)  # noqa: E731
    hr_held = _eval_images(bundle, "hr") if lr_held is not None else None
    # the teacher's targets in its own precision, before a frozen_dtype lever casts it in place
    targets = _teacher_targets(feats, sr_teacher, lr_held) if lr_held is not None else None
    dbundle = feature_distill_bundle(student, decoder, parts, config, export_official=False,
                                     teacher_decoder=teacher.get_submodule(bundle.family.decoder_path)
                                     if config.output_weight > 0 else None,
                                     teacher_denoiser=bundle.family.denoiser_path)
    before = _distill_measure(student, targets, hr_held) if targets is not None else None
    fit = after_init = None
    if config.init_conv_in == "lstsq":
        fit = _init_conv_in(bundle, student, teacher, parts, config)
        after_init = _distill_measure(student, targets, hr_held) if targets is not None else None
    artifacts = run_stage(dbundle, config, stage_dir, write_student=False)
    if config.frozen_dtype != "fp32":
        bundle.forget("teacher")  # cast to bf16/fp16 for training: later stages load it again at full precision
    student = artifacts.pop("model").adcsr.cpu().eval()
    after = _distill_measure(student, targets, hr_held) if targets is not None else None
    bundle.set_student(_trained(state, student))
    if before is not None:
        n = len(lr_held)
        drop = 100 * (1 - after["feature_l1"] / before["feature_l1"])
        artifacts["measured"] = {
            "student-teacher feature L1 (decoder mid-block)":
                f"{before['feature_l1']:.4f} -> {after['feature_l1']:.4f} ({drop:.1f} % lower)",
            "student SR vs teacher SR, PSNR-Y (dB)":
                f"{before['psnr_student_vs_teacher']:.2f} -> {after['psnr_student_vs_teacher']:.2f}",
            "student SR vs HR, PSNR-Y (dB)": f"{before['psnr_student_vs_hr']:.2f} -> {after['psnr_student_vs_hr']:.2f}",
        }
        artifacts["measured_images"] = n
        artifacts["measured_values"] = {"before": before, "after": after, "images": n}
        if after_init is not None:
            artifacts["measured"]["student SR vs teacher SR, PSNR-Y (dB), after the conv_in fit"] = \
                f"{before['psnr_student_vs_teacher']:.2f} -> {after_init['psnr_student_vs_teacher']:.2f}"
            artifacts["measured_values"]["after_init"] = after_init
    if fit is not None:
        artifacts["init_conv_in"] = fit.to_dict()
    return _relative(bundle, artifacts)


def _init_conv_in(bundle, student, teacher, parts, config: DistillConfig):
    """``init_conv_in: lstsq``: the student's UNet conv_in fitted to the teacher UNet's conv_in output
    (kept channels) on calibration LR crops of the training data (:mod:`compress.recover.init`)."""
    from ..data import RealESRGANDegradation
    from ..log import get_logger
    from ..recover.init import calibration_lr, fit_student_conv_in

    degradation = RealESRGANDegradation(config.degradation_config())
    batches = calibration_lr(config.train_hr, config.crop, degradation, config.init_crops,
                             config.engine.seed + 1000)
    fit = fit_student_conv_in(student, lambda lr: parts.teacher_latent(lr, None),
                              teacher.get_submodule(bundle.family.denoiser_path), batches, config.init_ridge)
    get_logger(__name__).info(f"[distill] conv_in fitted by least squares on {fit.crops} LR crops ({fit.rows} rows, "
                              f"{fit.unknowns} unknowns per channel, teacher channels: {fit.channels}): relative "
                              f"residual {fit.residual_before:.4f} -> {fit.residual_after:.4f}")
    return fit


def _trained(state, student):
    """The state with the distilled student (its own UNet and mid-block; the decoder's up path is the
    student's, trained with ``train_up``, else unchanged)."""
    from ..student import StudentState

    decoder = state.decoder.cpu()
    if any(a is not b for a, b in zip(student.up.parameters(), decoder.up_blocks.parameters())):
        # the up path is shared by design; should it not be (a copy), the decoder takes the trained one
        # (train_up), so the saved student keeps it
        decoder.load_state_dict({**decoder.state_dict(), **{
            k: v for k, v in student.up.state_dict().items()
            if k.split(".")[0] in ("up_blocks", "conv_norm_out", "conv_out")}})
    return StudentState(student, decoder, state.chains, state.info)
