"""``pretrain_decoder`` (stage 1) and ``distill`` (stage 2): recovery on the recover engine.

Both wrap :mod:`compress.recover` and keep the run's student directory up to date: stage 1
replaces the pruned decoder by the trained one (the student's mid-block and up path start
from it, as AdcSR builds its ``Net`` from ``halfDecoder.ckpt``); stage 2 trains the student's
UNet and mid-block against the teacher. Each reports a before/after measurement on the eval
data (``data.eval_lr``/``eval_hr``) so the report shows what the stage bought.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..recover.decoder_pretrain import PretrainDecoderConfig
from ..recover.distill import DistillConfig

__all__ = ["PretrainDecoderConfig", "DistillConfig", "run_pretrain_decoder", "run_distill"]


def _train_hr(bundle, config) -> list[Path]:
    roots = list(config.train_hr) or list(bundle.recipe.data.train_hr)
    return roots


def _plain_vae(bundle) -> nn.Module:
    """The VAE whose encoder makes stage-1 latents and stage-2 real features: stock SD 2.1 at full
    size (as the official code), the (LoRA-merged) tiny teacher's at tiny size."""
    if bundle.size == "full":
        from ..zoo.sd import load_sd_components

        return bundle.cached("sd_vae", lambda: load_sd_components(bundle.recipe.models.sd21_base, ("vae",))["vae"])
    teacher = copy.deepcopy(bundle.teacher()).cpu()
    if teacher.has_lora:
        teacher.merge_lora()
    return teacher.vae


def _eval_images(bundle, key: str, limit: int = 4) -> torch.Tensor | None:
    from ..data import PairedFolderDataset

    data = bundle.recipe.data
    if not (data.eval_lr and data.eval_hr):
        return None
    pairs = PairedFolderDataset(data.eval_lr, data.eval_hr, scale=bundle.recipe.task.scale)
    return torch.stack([pairs[i][key] for i in range(min(limit, len(pairs)))])


# --------------------------------------------------------------------------------------------
# stage 1
# --------------------------------------------------------------------------------------------
def run_pretrain_decoder_needs(bundle, config: PretrainDecoderConfig) -> list[str]:
    needs = bundle.missing_weights("sd21_base")
    if not _train_hr(bundle, config):
        needs.append("data.train_hr = HR image folders (LSDIR in the paper)")
    return needs


@torch.no_grad()
def _reconstruction_psnr(vae: nn.Module, decoder: nn.Module, hr01: torch.Tensor) -> float:
    from ..metrics import psnr_y

    z = vae.encode(hr01 * 2 - 1).latent_dist.mean
    rec = decoder(vae.post_quant_conv(z))
    return float(psnr_y(((rec + 1) / 2).clamp(0, 1), hr01).mean())


def run_pretrain_decoder(bundle, config: PretrainDecoderConfig, stage_dir: Path) -> dict[str, Any]:
    from ..recover.decoder_pretrain import DecoderModels, run_stage
    from ..student import compose_student, load_student, read_chain, save_student

    src = bundle.student_dir()
    student, decoder = load_student(src)
    vae = _plain_vae(bundle).eval().requires_grad_(False)
    held_out = _eval_images(bundle, "hr")
    before = _reconstruction_psnr(vae, decoder, held_out) if held_out is not None else None
    config = replace(config, train_hr=_train_hr(bundle, config))
    artifacts = run_stage(DecoderModels(vae=vae, decoder=decoder), config, stage_dir)
    decoder = decoder.cpu().eval()
    after = _reconstruction_psnr(vae.cpu(), decoder, held_out) if held_out is not None else None
    new = compose_student(student.unet, decoder, student.config.unshuffle, student.color_fix)
    out = save_student(stage_dir / "student", new, read_chain(src / "unet"), decoder, read_chain(src / "decoder"))
    artifacts["student"] = str(out)
    if before is not None:
        artifacts["measured"] = {"reconstruction PSNR-Y on the eval HR images (dB), before -> after":
                                 f"{before:.2f} -> {after:.2f} ({len(held_out)} HR images, full size)"}
    return artifacts


# --------------------------------------------------------------------------------------------
# stage 2
# --------------------------------------------------------------------------------------------
def run_distill_needs(bundle, config: DistillConfig) -> list[str]:
    needs = bundle.missing_weights("sd21_base", "osediff")
    if config.prompt == "dape":
        needs += bundle.missing_weights("ram", "dape", "ram_tag_list")
    if not _train_hr(bundle, config):
        needs.append("data.train_hr = HR image folders (LSDIR in the paper)")
    return needs


def _disc_unet(bundle) -> nn.Module:
    """D starts from the plain SD 2.1-base UNet (official); at tiny size, the tiny teacher's UNet merged."""
    if bundle.size == "full":
        from ..zoo.sd import load_sd_components

        return load_sd_components(bundle.recipe.models.sd21_base, ("unet",))["unet"]
    teacher = copy.deepcopy(bundle.teacher()).cpu()
    if teacher.has_lora:
        teacher.merge_lora()
    return teacher.unet


@torch.no_grad()
def _distill_measure(student, teacher_feats, teacher, lr01: torch.Tensor) -> dict[str, float]:
    from ..metrics import psnr_y

    device = next(teacher.parameters()).device
    student.to(device)
    lr = (lr01 * 2 - 1).to(device)
    f_s, f_t = student.features(lr), teacher_feats(lr)
    sr_s = (student(lr) + 1) / 2
    sr_t = (teacher(lr) + 1) / 2
    return {"feature_l1": float((f_s - f_t).abs().mean()),
            "psnr_student_vs_teacher": float(psnr_y(sr_s.clamp(0, 1), sr_t.clamp(0, 1)).mean())}


def run_distill(bundle, config: DistillConfig, stage_dir: Path) -> dict[str, Any]:
    from ..io import load_safetensors
    from ..recover.distill import AdcSRTeacherFeatures, DecoderFeatures, adcsr_bundle, run_stage
    from ..student import load_student, read_chain, save_student

    src = bundle.student_dir()
    student, decoder = load_student(src)
    teacher = bundle.teacher()
    gt_vae = _plain_vae(bundle)
    disc = _disc_unet(bundle) if config.adv_weight > 0 else None
    config = replace(config, train_hr=_train_hr(bundle, config))
    lr_held = _eval_images(bundle, "lr")
    feats = AdcSRTeacherFeatures(teacher, DecoderFeatures(copy.deepcopy(decoder).to(bundle.device))).eval()
    dbundle = adcsr_bundle(student, teacher, decoder, disc, config, gt_vae=gt_vae)
    before = _distill_measure(student, feats, teacher, lr_held) if lr_held is not None else None
    artifacts = run_stage(dbundle, config, stage_dir)
    student.load_state_dict(load_safetensors(artifacts["adcsr"]))
    student.eval()
    after = _distill_measure(student, feats, teacher, lr_held) if lr_held is not None else None
    out = save_student(stage_dir / "student", student.cpu(), read_chain(src / "unet"), decoder.cpu(),
                       read_chain(src / "decoder"))
    artifacts["student"] = str(out)
    if before is not None:
        n = len(lr_held)
        drop = 100 * (1 - after["feature_l1"] / before["feature_l1"])
        artifacts["measured"] = {
            "student-teacher feature L1 on the eval LR images, before -> after":
                f"{before['feature_l1']:.4f} -> {after['feature_l1']:.4f} ({drop:.1f} % lower; {n} LR images, full size)",
            "PSNR-Y of student vs teacher SR on the eval LR images (dB), before -> after":
                f"{before['psnr_student_vs_teacher']:.2f} -> {after['psnr_student_vs_teacher']:.2f}",
        }
    return artifacts
