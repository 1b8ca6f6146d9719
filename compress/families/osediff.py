"""The ``osediff`` family: OSEDiff (SD 2.1-base + LoRA, DAPE prompts, one step at t = 999).

The AdcSR flagship: AdcSR's student starts from SD 2.1-base (not from OSEDiff), distils from
OSEDiff at the half decoder's mid-block and judges with a discriminator made from SD 2.1-base.
Where AdcSR's ``train.py`` and OSEDiff's ``test_osediff.py`` do a thing, this family does it
the same way:

* stage 2's teacher path (``train.py``): LR in [-1, 1] -> bicubic x4 *without* a clamp ->
  LoRA VAE encoder, latent *mean* x 0.18215 -> LoRA UNet at t = 999 with the CLIP embedding of
  the DAPE tags of the LR (RAM's transform resizes the LR itself to 384 px) -> analytic x0;
  the prompt is the bare tag string; the real path encodes HR with the stock SD 2.1 VAE;
* evaluating the teacher (``test_osediff.py``): PIL bicubic x4 of the 8-bit LR (small inputs
  first enlarged so the short side reaches ``process_size / 4``), DAPE tags of that x4 image,
  prompt ``f"{tags}, {user_prompt},"``, a latent *sample*, AdaIN colour fix on 8-bit images.
  Deliberate deviations are named options: ``eval_latent: mode`` (deterministic), a seeded
  sample, and the final resize back to x4 of the original size that the script computes but
  discards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from dataclasses import fields as _fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdcError
from .base import DistillParts, ModelFamily, PipelineSpec, StudentParts, check_paths
from .sd import DecodeInput, RealLatent, merged_copy
from ..config import ranged

def dataclass_fields(cls) -> set[str]:
    return {f.name for f in _fields(cls)}


SD_DIR_HELP = "an SD 2.1-base diffusers folder (unet/ vae/ text_encoder/ tokenizer/)"


@dataclass
class OSEDiffWeights:
    """Local files of the released OSEDiff (nothing is downloaded)."""

    sd21_base: Path | None = None      # SD 2.1-base diffusers folder: unet/ vae/ text_encoder/ tokenizer/
    osediff: Path | None = None        # osediff.pkl (OSEDiff's LoRA layout or AdcSR's merged variant)
    ram: Path | None = None            # ram_swin_large_14m.pth (DAPE backbone)
    dape: Path | None = None           # DAPE.pth (DAPE LoRA)
    ram_tag_list: Path | None = None   # RAM's ram_tag_list.txt (tags -> text)

    HELP: ClassVar[dict[str, str]] = {
        "sd21_base": SD_DIR_HELP,
        "osediff": "OSEDiff's osediff.pkl",
        "ram": "ram_swin_large_14m.pth (RAM Swin-L)",
        "dape": "DAPE.pth (OSEDiff's DAPE LoRA)",
        "ram_tag_list": "RAM's ram_tag_list.txt",
    }

    def validate(self, path: str) -> None:
        check_paths(self, path)
        if self.sd21_base is not None and not (self.sd21_base / "unet").is_dir():
            raise AdcError(f"{path}.sd21_base: {self.sd21_base} has no unet/ folder; expected {SD_DIR_HELP}")

    def missing(self, *names: str) -> list[str]:
        return [f"models.weights.{n} = {self.HELP[n]}" for n in names if getattr(self, n) is None]


@dataclass
class OSEDiffOptions:
    """How the teacher is evaluated (OSEDiff's test script by default) and prompted."""

    eval_latent: Literal["sample", "mode"] = "sample"   # test_osediff.py samples latent_dist
    eval_seed: int = ranged(42, 0, 2**32 - 1)  # the script's --seed, here used to seed that sample
    eval_color_fix: Literal["adain", "wavelet", "none"] = "adain"
    process_size: int = ranged(512, 16, 8192)  # inputs smaller than process_size/4 are enlarged first
    user_prompt: str = ""                               # test_osediff.py --prompt

    def validate(self, path: str) -> None:
        if self.eval_color_fix == "wavelet":
            raise AdcError(f"{path}.eval_color_fix: 'wavelet' is not implemented; use adain or none")
        if self.process_size < 4:
            raise AdcError(f"{path}.process_size: expected >= 4, got {self.process_size}")


def _osediff_calls(model: nn.Module, lr: torch.Tensor) -> list:
    calls = []
    pe = model.prompt_extractor
    if pe is not None:
        # The deployed pipeline tags the x4 LR at 384 px; the resize runs in fp32 and its result is
        # cast, as OSEDiff's ram_transforms(lq).to(weight_dtype) (CPU has no half antialiased resize).
        calls.append(("DAPE tag logits",
                      lambda x: pe(pe.preprocess((model.upscale(x).float() + 1) / 2).to(x.dtype)), (lr,)))
    calls.append(("forward", model, (lr,)))
    return calls


PROFILE = PipelineSpec(
    "OSEDiff", _osediff_calls, mergeable_lora=True,
    includes=("DAPE tag path (RAM Swin-L + tagging head, x4 LR resized to 384 px); CLIP-H text encoder "
              "(one 77-token prompt); bicubic x4; VAE encoder at the x4 size; UNet once (t = 999); "
              "VAE decoder. LoRA merged (UNet, VAE, DAPE). Params include DAPE's captioning modules "
              "that tag inference never runs (RAM checkpoint; 470.93 M DAPE vs 212.7 M tag path)."))


class OSEDiffFamily(ModelFamily):
    name = "osediff"
    title = "OSEDiff"
    Weights = OSEDiffWeights
    Options = OSEDiffOptions
    profile = PROFILE

    @property
    def students(self):  # type: ignore[override]
        from ..zoo.adcsr import build_adcsr

        return {"adcsr": build_adcsr}

    @property
    def parts(self):  # type: ignore[override]
        from ..zoo.dape import build_dape

        return {"dape": build_dape}

    def migration_hint(self, key: str, models: dict) -> str | None:
        """adc 0.1 recipes: ``models: {teacher: osediff, sd21_base: ..., osediff: ...}``."""
        if key in ("teacher",) or key in dataclass_fields(OSEDiffWeights):
            return (f"write models: {{family: osediff, size: {models.get('size', 'full')}, weights: {{sd21_base: ..., "
                    "osediff: ..., ram: ..., dape: ..., ram_tag_list: ...}} ('teacher: osediff' is now "
                    "'family: osediff'; weight paths go under models.weights)")
        return None

    # ---------------------------------------------------------------- teacher
    def build_teacher(self, size: str, device: str | torch.device = "cpu", options: Any = None) -> nn.Module:
        from ..zoo.osediff import build_osediff

        return build_osediff(size, device)

    def teacher_needs(self, weights: OSEDiffWeights) -> list[str]:
        return weights.missing("sd21_base", "osediff")

    def prompt_needs(self, weights: OSEDiffWeights) -> list[str]:
        needs = weights.missing("sd21_base", "ram", "dape", "ram_tag_list")
        if weights.sd21_base is not None and not (weights.sd21_base / "tokenizer").is_dir():
            needs.append(f"{weights.sd21_base}/tokenizer (the CLIP tokenizer of {SD_DIR_HELP})")
        return needs

    def load_teacher(self, size: str, weights: OSEDiffWeights, device: str | torch.device = "cpu",
                     options: Any = None) -> nn.Module:
        if size != "full":
            return self.build_teacher(size, device, options)
        from ..zoo.osediff import load_osediff_weights

        needs = self.teacher_needs(weights)
        if needs:
            raise AdcError(f"the OSEDiff teacher needs {'; '.join(needs)}")
        model = load_osediff_weights(weights.sd21_base, weights.osediff, weights.ram, weights.dape)
        if not self.prompt_needs(weights):
            from transformers import CLIPTokenizer

            from ..zoo.dape import load_tag_list

            tok = CLIPTokenizer.from_pretrained(weights.sd21_base / "tokenizer", local_files_only=True)
            model.set_prompting(tok, load_tag_list(weights.ram_tag_list))
        return model.to(device)

    @contextlib.contextmanager
    def training_view(self, teacher: nn.Module):
        """DAPE is set aside while a tiny teacher trains (it is not trained, and its tied BERT weights
        would clutter every checkpoint); it is back in place afterwards."""
        dape, teacher.prompt_extractor = teacher.prompt_extractor, None
        try:
            yield teacher
        finally:
            teacher.prompt_extractor = dape

    def teacher_trainable(self, teacher: nn.Module) -> list[nn.Parameter]:
        # The text encoder and DAPE stay as built (OSEDiff never trains them either).
        frozen = {id(p) for m in (teacher.text_encoder, teacher.prompt_extractor) if m is not None
                  for p in m.parameters()}
        return [p for p in teacher.parameters() if id(p) not in frozen]

    def teacher_autoencode(self, teacher: nn.Module, image: torch.Tensor) -> torch.Tensor:
        return teacher.decode(teacher.encode(image, sample=True))

    def teacher_forward(self, teacher: nn.Module, lr: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Training samples the LR latent (OSEDiff's ``latent_dist.sample()``), so the encoder learns a
        variance that ``test_osediff.py``'s sampled latent can live with; measuring uses the mode."""
        with torch.no_grad():
            emb = teacher.encode_prompt()  # the fixed empty prompt: a tiny teacher has no tagger weights
        return teacher(lr, emb.to(lr.device), sample=train)

    def evaluate_needs(self, weights: OSEDiffWeights) -> list[str]:
        """``test_osediff.py`` prompts every image with its DAPE tags: without them it is another model."""
        return self.prompt_needs(weights)

    @torch.no_grad()
    def evaluate_teacher(self, teacher: nn.Module, lr01: torch.Tensor, options: OSEDiffOptions | None = None
                         ) -> torch.Tensor:
        """``test_osediff.py`` on each image of the batch; see the module docstring."""
        from PIL import Image

        from ..zoo.osediff import adain_color_fix

        o = options or OSEDiffOptions()
        out = []
        for i in range(lr01.shape[0]):
            lr8 = (lr01[i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            img = Image.fromarray(lr8)
            w, h = img.size
            small = o.process_size // 4
            if w < small or h < small:
                s = small / min(w, h)
                img = img.resize((int(s * w), int(s * h)))  # PIL's default: bicubic
            img = img.resize((img.size[0] * 4, img.size[1] * 4))
            img = img.resize((img.width - img.width % 8, img.height - img.height % 8), Image.LANCZOS)
            dev = next(teacher.parameters()).device
            up01 = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float().div(255).to(dev)
            emb = None
            if teacher.tokenizer is not None and teacher.tag_list is not None and teacher.prompt_extractor is not None:
                tags = teacher.prompt_extractor.generate_tags(up01, teacher.tag_list)
                emb = teacher.encode_prompt(prompts=[f"{tags[0]}, {o.user_prompt},"])
            gen = torch.Generator(device=dev).manual_seed(o.eval_seed) if o.eval_latent == "sample" else None
            sr = teacher.sr_from_upscaled(up01 * 2 - 1, emb, sample=o.eval_latent == "sample", generator=gen)
            sr01 = torch.floor((sr.float() * 0.5 + 0.5) * 255) / 255  # ToPILImage truncates to 8 bits
            if o.eval_color_fix == "adain":
                sr01 = torch.floor(adain_color_fix(sr01, up01).clamp(0, 1) * 255) / 255
            if sr01.shape[-2:] != (h * 4, w * 4):  # the script computes this resize but discards it (named deviation)
                sr01 = F.interpolate(sr01, size=(h * 4, w * 4), mode="bicubic", align_corners=False).clamp(0, 1)
            out.append(sr01)
        return torch.cat(out)

    # ---------------------------------------------------------------- task
    def facts(self, prompt: str, timestep: int):
        from ..analysis.facts import TaskFacts

        return TaskFacts(prompt=prompt, constant={"timestep": timestep}, prompt_sources=("prompt_extractor",),
                         prompt_encoders=("text_encoder",), edges=(("prompt_extractor", "text_encoder"),))

    # ---------------------------------------------------------------- student
    def init_needs(self, init: str, weights: OSEDiffWeights) -> list[str]:
        if init == "base":
            return weights.missing("sd21_base")
        if init == "teacher":
            return self.teacher_needs(weights)
        return []

    def student_parts(self, size: str, weights: OSEDiffWeights, init: str, teacher, device="cpu") -> StudentParts:
        """AdcSR starts its student from SD 2.1-base (``init: base``, the official ``train.py``)."""
        from ..student import decoder_part, unet_part
        from ..zoo.osediff import OSEDIFF, OSEDIFF_TINY
        from ..zoo.sd import build_unet, build_vae, load_sd_components

        cfg = OSEDIFF if size == "full" else OSEDIFF_TINY
        if init == "base" and size == "full" and weights.sd21_base is not None:
            parts = load_sd_components(weights.sd21_base, ("unet", "vae"))
            unet, vae, source = parts["unet"], parts["vae"], "SD 2.1-base (models.weights.sd21_base)"
        elif init == "teacher" or (init == "base" and size == "tiny"):
            t = teacher()
            unet, vae = merged_copy(t.unet), merged_copy(t.vae)
            source = "the teacher (LoRA merged)" + (" (a tiny family has no SD 2.1-base: init base -> teacher)"
                                                    if init == "base" else "")
        else:
            meta = init != "random"
            unet = build_unet(cfg.sd_size, "meta" if meta else device, **cfg.unet_overrides)
            vae = build_vae(cfg.sd_size, "meta" if meta else device, **cfg.vae_overrides)
            source = "random init (init: random)" if not meta else \
                "structure only: no weights given (models.weights.sd21_base), built on meta"
        return StudentParts(unet_part(unet, self.denoiser_path), decoder_part(vae, self.decoder_path), source)

    # ---------------------------------------------------------------- distillation
    def distill_needs(self, weights: OSEDiffWeights, prompt: str) -> list[str]:
        needs = self.teacher_needs(weights)
        if prompt == "dape":
            needs += [n for n in self.prompt_needs(weights) if n not in needs]
        return needs

    def real_vae_needs(self, weights: OSEDiffWeights) -> list[str]:
        return weights.missing("sd21_base")

    def real_vae(self, size: str, weights: OSEDiffWeights, teacher) -> nn.Module:
        """The stock SD 2.1 VAE (``train.py`` encodes HR with it); tiny: the teacher's, LoRA merged."""
        if size == "full":
            from ..zoo.sd import load_sd_components

            return load_sd_components(weights.sd21_base, ("vae",))["vae"]
        return merged_copy(teacher().vae)

    def distill_parts(self, teacher: nn.Module, size: str, weights: OSEDiffWeights, options: Any = None
                      ) -> DistillParts:
        from ..zoo.osediff import unet_lora_targets
        from ..zoo.sd import alpha_bar

        if size == "full":
            from ..zoo.sd import load_sd_components

            disc_unet = load_sd_components(weights.sd21_base, ("unet",))["unet"]
        else:
            disc_unet = merged_copy(teacher.unet)
        real = self.real_vae(size, weights, lambda: teacher)
        a = alpha_bar(teacher.timestep)

        def teacher_latent(lr: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
            up = F.interpolate(lr, scale_factor=teacher.scale, mode="bicubic")  # train.py: no clamp
            z = teacher.vae.encode(up).latent_dist.mean * teacher.scaling_factor
            if emb is None:
                emb = teacher.encode_prompt().to(z.device)
            emb = emb.expand(z.shape[0], -1, -1) if emb.shape[0] == 1 else emb
            t = torch.full((z.shape[0],), teacher.timestep, device=z.device, dtype=torch.long)
            eps = teacher.unet(z, t, encoder_hidden_states=emb.to(z.dtype)).sample
            return (z - (1 - a) ** 0.5 * eps) / a ** 0.5

        notes = []
        if weights is not None and size == "full" and self.prompt_needs(weights):
            notes.append("DAPE prompts need " + "; ".join(self.prompt_needs(weights)))
        return DistillParts(
            teacher_latent=teacher_latent,
            decode_input=DecodeInput(teacher.vae, teacher.scaling_factor),
            real_latent=RealLatent(real),
            disc_unet=disc_unet,
            disc_lora_targets=unet_lora_targets,
            prompts=lambda mode, text: _Prompts(teacher, mode, text),
            timestep=teacher.timestep, teacher=teacher, notes=notes)


class _Prompts:
    """Text embeddings for stage 2: ``dape`` (``train.py``: tags of the LR as RAM's transform resizes
    it, the bare tag string), ``fixed`` (one text) or ``empty``. Fixed/empty are embedded once."""

    def __init__(self, teacher: nn.Module, mode: str, text: str = ""):
        self.teacher, self.mode, self.text = teacher, mode, text
        self._fixed: torch.Tensor | None = None
        if mode == "dape" and not all(getattr(teacher, a, None) is not None
                                      for a in ("tokenizer", "tag_list", "prompt_extractor")):
            raise AdcError("prompt 'dape' needs the teacher's tokenizer, RAM tag list and DAPE weights "
                           "(models.weights.sd21_base with tokenizer/, ram, dape, ram_tag_list)")

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        if self.mode == "dape":
            tags = t.prompt_extractor.generate_tags(((lr.float() + 1) / 2).clamp(0, 1), t.tag_list)
            return t.encode_prompt(prompts=tags).to(lr.device)
        if self._fixed is None:
            self._fixed = t.encode_prompt(prompts=[self.text]) if self.mode == "fixed" else t.encode_prompt()
        emb = self._fixed.to(lr.device)
        return emb.expand(lr.shape[0], -1, -1)


__all__ = ["OSEDiffFamily", "OSEDiffWeights", "OSEDiffOptions", "PROFILE"]
