"""OSEDiff (Wu et al., NeurIPS 2024), AdcSR's teacher: SD 2.1-base + LoRA, one step at t = 999.

LR [-1,1] -> bicubic x4 -> VAE encoder (+ LoRA) -> latent x 0.18215 -> UNet (+ LoRA) at t = 999
conditioned on the CLIP embedding of a DAPE tag prompt -> analytic x0 -> VAE decoder -> clamp.
1765.3 M parameters at full size (UNet 865.91 + VAE 83.65 + CLIP-H text 340.39 + DAPE 470.93 +
LoRA 4.43).

The LoRA is added through peft exactly as OSEDiff's ``initialize_unet``/``initialize_vae`` do it
(rank 4, gaussian init, three UNet adapters chosen by a name grep, one on the VAE encoder), so
``osediff.pkl`` keys load as they are. Loaders and writers cover OSEDiff's ``osediff.pkl``
(LoRA + ``conv_in``; base weights from an SD 2.1-base diffusers directory) and AdcSR's variant of
it (full LoRA-merged ``unet``/``vae`` state dicts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdcError
from .construct import build_module
from .dape import DAPE, DAPE_FULL, DAPE_TINY, DAPEConfig, build_dape
from .lora import (UNET_ADAPTERS, add_adapter, check_tensors, lora_layers, merge_and_unload,
                   merged_state_dict, read_checkpoint_dict)
from .lora import sd_unet_lora_targets as unet_lora_targets
from .sd import build_text_encoder, build_unet, build_vae, one_step_x0

VAE_GREP: tuple[str, ...] = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out",
                             "to_k", "to_q", "to_v", "to_out.0")
VAE_ADAPTER = "default_encoder"

# SD 2.x CLIP tokenizer ids: <|startoftext|>, <|endoftext|>, and its pad token "!".
BOS_ID, EOS_ID, PAD_ID, MAX_TOKENS = 49406, 49407, 0, 77


def empty_prompt_ids(batch: int = 1, length: int = MAX_TOKENS) -> torch.Tensor:
    """The token ids SD 2.x's tokenizer gives the empty prompt "" (BOS, EOS, then pad 0).

    Used when no tokenizer is available: the text encoder still runs, on a fixed sequence.
    """
    ids = torch.full((batch, length), PAD_ID, dtype=torch.long)
    ids[:, 0], ids[:, 1] = BOS_ID, EOS_ID
    return ids


def vae_lora_targets(vae: nn.Module) -> list[str]:
    """OSEDiff's VAE grep, repeats included (one entry per matching pattern, as osediff.pkl stores it).

    Encoder convs and attention projections plus ``quant_conv``: 32 unique modules for SD's VAE.
    """
    out: list[str] = []
    for n, _ in vae.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in VAE_GREP:
            if pattern in n and "encoder" in n:
                out.append(n.replace(".weight", ""))
            elif "quant_conv" in n and "post_quant_conv" not in n:
                out.append(n.replace(".weight", ""))
    return out


@dataclass(frozen=True)
class OSEDiffConfig:
    """Sizes and fixed settings. ``sd_size`` picks the SD widths ("full" = SD 2.1-base, or "tiny")."""

    sd_size: str = "full"
    lora_rank_unet: int = 4
    lora_rank_vae: int = 4
    timestep: int = 999
    scale: int = 4
    scaling_factor: float = 0.18215
    dape: DAPEConfig | None = DAPE_FULL
    sample_latent: bool = False  # OSEDiff samples latent_dist; the mode (= mean) is the deterministic default
    # diffusers config changes on top of the SD widths (the tiny teacher's own widths and latent channels)
    unet_overrides: dict[str, Any] = field(default_factory=dict)
    vae_overrides: dict[str, Any] = field(default_factory=dict)


OSEDIFF = OSEDiffConfig()
# The tiny teacher: SD's tiny widths, but a 16-channel latent and a wider VAE, so that a from-scratch
# model can carry the LR's information through the /8 latent and beat bicubic (4 channels cannot:
# an 8x8 HR block holds 2x2x3 = 12 LR values). Every block type OSEDiff has is still there.
OSEDIFF_TINY = OSEDiffConfig(sd_size="tiny", dape=DAPE_TINY,
                             unet_overrides={"in_channels": 16, "out_channels": 16},
                             vae_overrides={"block_out_channels": (16, 32, 64, 64), "latent_channels": 16})


class OSEDiff(nn.Module):
    """One-step SR: LR [-1,1] (B,3,h,w) -> SR [-1,1] (B,3,4h,4w)."""

    timestep = 999
    scale = 4
    scaling_factor = 0.18215

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                 prompt_extractor: DAPE | None = None, config: OSEDiffConfig = OSEDIFF, add_lora: bool = True):
        super().__init__()
        self.config = config
        self.timestep, self.scale, self.scaling_factor = config.timestep, config.scale, config.scaling_factor
        self.prompt_extractor = prompt_extractor
        self.text_encoder = text_encoder
        self.vae = vae
        self.unet = unet
        # Filled by the user for text prompts (never downloaded): a CLIP tokenizer and RAM's tag list.
        self.tokenizer: Any = None
        self.tag_list: list[str] | None = None
        self.unet_lora_modules: dict[str, list[str]] = {}
        self.vae_lora_modules: list[str] = []
        if add_lora:
            self._add_lora()

    @classmethod
    def from_config(cls, config: OSEDiffConfig = OSEDIFF) -> "OSEDiff":
        # The sd builders set their own default device; pass on the current one (meta when counting).
        device = torch.get_default_device()
        dape = DAPE(config.dape) if config.dape is not None else None
        return cls(build_unet(config.sd_size, device, **config.unet_overrides),
                   build_vae(config.sd_size, device, **config.vae_overrides),
                   build_text_encoder(config.sd_size, device), dape, config)

    # ---------------------------------------------------------------- LoRA
    def _add_lora(self) -> None:
        """OSEDiff's adapters (grep lists computed on the plain modules, before any wrapping)."""
        self.unet_lora_modules = unet_lora_targets(self.unet)
        self.vae_lora_modules = vae_lora_targets(self.vae)
        for name in UNET_ADAPTERS:
            add_adapter(self.unet, self.unet_lora_modules[name], self.config.lora_rank_unet, name)
        self.unet.set_adapter(list(UNET_ADAPTERS))  # add_adapter leaves only the last one active
        add_adapter(self.vae, self.vae_lora_modules, self.config.lora_rank_vae, VAE_ADAPTER)
        self.vae.set_adapter([VAE_ADAPTER])

    @property
    def has_lora(self) -> bool:
        return bool(lora_layers(self.unet) or lora_layers(self.vae))

    def merge_lora(self) -> "OSEDiff":
        """Fold every LoRA into its base weight (peft merge_and_unload); plain diffusers modules remain."""
        merge_and_unload(self.unet)
        merge_and_unload(self.vae)
        return self

    # ---------------------------------------------------------------- prompts
    def set_prompting(self, tokenizer: Any = None, tag_list: Sequence[str] | None = None) -> None:
        """A local CLIP tokenizer (``CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer")``), RAM's tag list."""
        self.tokenizer = tokenizer
        self.tag_list = list(tag_list) if tag_list is not None else None

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise AdcError("text prompts need a CLIP tokenizer: call set_prompting(tokenizer=...) "
                           "with one loaded from a local SD directory, or pass prompt_embeds/token_ids")
        return self.tokenizer(list(prompts), max_length=MAX_TOKENS, padding="max_length", truncation=True,
                              return_tensors="pt").input_ids

    def dape_prompts(self, lr: torch.Tensor, user_prompt: str = "") -> list[str]:
        """OSEDiff's test prompt: DAPE tags of the x4 LR, then the user prompt: f"{tags}, {user_prompt},"."""
        if self.prompt_extractor is None or self.tag_list is None:
            raise AdcError("DAPE prompts need the prompt extractor and RAM's tag list (set_prompting(tag_list=...))")
        up01 = (self.upscale(lr) + 1) / 2
        tags = self.prompt_extractor.generate_tags(up01, self.tag_list)
        return [f"{t}, {user_prompt}," for t in tags]

    def encode_prompt(self, prompts: Sequence[str] | None = None, token_ids: torch.Tensor | None = None,
                      lr: torch.Tensor | None = None, user_prompt: str = "") -> torch.Tensor:
        """CLIP text embeddings (B or 1, 77, D), from the first source available:

        ``token_ids``; ``prompts`` (needs the tokenizer); DAPE tags of ``lr`` (needs tokenizer,
        prompt extractor weights and tag list); otherwise the fixed empty-prompt sequence of
        :func:`empty_prompt_ids` (one row, broadcast over the batch).
        """
        if token_ids is None:
            if prompts is not None:
                token_ids = self.tokenize(prompts)
            elif lr is not None and self.tokenizer is not None and self.tag_list is not None \
                    and self.prompt_extractor is not None:
                token_ids = self.tokenize(self.dape_prompts(lr, user_prompt))
            else:
                token_ids = empty_prompt_ids()
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(token_ids.to(device))[0]

    # ---------------------------------------------------------------- inference
    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        """Bicubic x4 in [-1,1] (OSEDiff resizes with PIL bicubic); clamped, as bicubic overshoots."""
        return F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(-1, 1)

    def encode(self, image: torch.Tensor, sample: bool | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE latent x scaling: the distribution's mode by default, a sample when asked (or a generator is given)."""
        dist = self.vae.encode(image).latent_dist
        sample = self.config.sample_latent if sample is None else sample
        z = dist.sample(generator) if (sample or generator is not None) else dist.mode()
        return z * self.scaling_factor

    def _prompt(self, prompt_embeds: torch.Tensor | None, lr: torch.Tensor | None, batch: int) -> torch.Tensor:
        emb = self.encode_prompt(lr=lr) if prompt_embeds is None else prompt_embeds
        if emb.shape[0] == 1 and batch > 1:
            emb = emb.expand(batch, -1, -1)
        if emb.shape[0] != batch:
            raise AdcError(f"prompt_embeds has batch {emb.shape[0]}, the LR batch is {batch}")
        return emb

    def teacher_latent(self, lr: torch.Tensor, prompt_embeds: torch.Tensor | None = None,
                       sample: bool | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The one-step x0 latent (scaled, as the UNet sees it): AdcSR's distillation target."""
        z = self.encode(self.upscale(lr), sample, generator)
        emb = self._prompt(prompt_embeds, lr, lr.shape[0]).to(z.dtype)
        t = torch.tensor([self.timestep], device=z.device, dtype=torch.long)
        eps = self.unet(z, t, encoder_hidden_states=emb).sample
        return one_step_x0(z, eps, self.timestep)

    def sr_from_upscaled(self, up: torch.Tensor, prompt_embeds: torch.Tensor | None = None,
                         sample: bool | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """OSEDiff_test's forward: an already x4-resized input in [-1, 1] -> SR in [-1, 1]."""
        z = self.encode(up, sample, generator)
        emb = self._prompt(prompt_embeds, None, up.shape[0]).to(z.dtype)
        t = torch.tensor([self.timestep], device=z.device, dtype=torch.long)
        return self.decode(one_step_x0(z, self.unet(z, t, encoder_hidden_states=emb).sample, self.timestep))

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(x0 / self.scaling_factor).sample.clamp(-1, 1)

    def forward(self, lr: torch.Tensor, prompt_embeds: torch.Tensor | None = None,
                sample: bool | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.teacher_latent(lr, prompt_embeds, sample, generator))

    def components(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {}
        if self.prompt_extractor is not None:
            parts["prompt_extractor"] = self.prompt_extractor
        parts["text_encoder"] = self.text_encoder
        parts["vae.encoder"] = nn.ModuleDict({"encoder": self.vae.encoder, "quant_conv": self.vae.quant_conv})
        parts["unet"] = self.unet
        parts["vae.decoder"] = nn.ModuleDict({"post_quant_conv": self.vae.post_quant_conv, "decoder": self.vae.decoder})
        return parts


def adain_color_fix(target01: torch.Tensor, source01: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """OSEDiff's ``adain_color_fix`` on (B,3,H,W) images in [0, 1]: per channel, ``target`` gets the
    mean and std (unbiased variance + ``eps``) of ``source``; clamped to [0, 1] as the script does."""
    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        return flat.mean(2)[..., None, None], (flat.var(2) + eps).sqrt()[..., None, None]

    (mt, st), (ms, ss) = stats(target01), stats(source01)
    return ((target01 - mt) / st * ss + ms).clamp(0, 1)


def build_osediff(size: str = "full", device: str | torch.device = "cpu",
                  config: OSEDiffConfig | None = None) -> OSEDiff:
    if config is None:
        if size not in ("full", "tiny"):
            raise AdcError(f"model size {size!r} is not one of full, tiny")
        config = OSEDIFF if size == "full" else OSEDIFF_TINY
    return build_module(lambda: OSEDiff.from_config(config), device)


ZOO = {"osediff": build_osediff, "dape": build_dape}


# --------------------------------------------------------------------------------------------
# Checkpoint layouts
# --------------------------------------------------------------------------------------------
OSEDIFF_KEYS = ("vae_lora_encoder_modules", "unet_lora_encoder_modules", "unet_lora_decoder_modules",
                "unet_lora_others_modules", "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae")
_MODULE_KEYS = {"unet_lora_encoder_modules": "default_encoder", "unet_lora_decoder_modules": "default_decoder",
                "unet_lora_others_modules": "default_others"}


def _unet_saved(k: str) -> bool:
    return "lora" in k or "conv_in" in k  # OSEDiff_gen.save_model's filter


def osediff_state_dict(model: OSEDiff) -> dict[str, Any]:
    """``osediff.pkl`` as OSEDiff's ``save_model`` writes it: module lists, ranks, LoRA (+ conv_in) tensors."""
    if not model.has_lora:
        raise AdcError("the model's LoRA is merged; osediff.pkl stores unmerged LoRA (use adcsr_osediff_state_dict)")
    return {
        "vae_lora_encoder_modules": list(model.vae_lora_modules),
        "unet_lora_encoder_modules": list(model.unet_lora_modules["default_encoder"]),
        "unet_lora_decoder_modules": list(model.unet_lora_modules["default_decoder"]),
        "unet_lora_others_modules": list(model.unet_lora_modules["default_others"]),
        "rank_unet": model.config.lora_rank_unet,
        "rank_vae": model.config.lora_rank_vae,
        "state_dict_unet": {k: v.detach().clone() for k, v in model.unet.state_dict().items() if _unet_saved(k)},
        "state_dict_vae": {k: v.detach().clone() for k, v in model.vae.state_dict().items() if "lora" in k},
    }


def load_osediff_pkl(model: OSEDiff, src: str | Path | dict) -> None:
    """Load OSEDiff's ``osediff.pkl`` (LoRA + conv_in) into ``model``, whose base weights are already set.

    Ranks, adapter module lists, key sets and shapes must all match the model's; anything else
    is an :class:`AdcError`.
    """
    sd, name = read_checkpoint_dict(src, "osediff.pkl")
    if "unet" in sd and "vae" in sd and "state_dict_unet" not in sd:
        raise AdcError(f"{name}: has 'unet'/'vae' full state dicts, AdcSR's variant; use load_adcsr_osediff")
    for key in OSEDIFF_KEYS:
        if key not in sd:
            raise AdcError(f"{name}: missing key {key!r} (expected OSEDiff's osediff.pkl layout)")
    if not model.has_lora:
        raise AdcError("the model's LoRA is already merged; load osediff.pkl before merge_lora()")
    for key, want in (("rank_unet", model.config.lora_rank_unet), ("rank_vae", model.config.lora_rank_vae)):
        if sd[key] != want:
            raise AdcError(f"{name}: {key}={sd[key]!r}, the model has LoRA rank {want}")
    for key, adapter in _MODULE_KEYS.items():
        if set(sd[key]) != set(model.unet_lora_modules[adapter]):
            diff = sorted(set(sd[key]) ^ set(model.unet_lora_modules[adapter]))
            raise AdcError(f"{name}: {key} differs from the model's {adapter} modules (e.g. {diff[0]!r})")
    if set(sd["vae_lora_encoder_modules"]) != set(model.vae_lora_modules):
        diff = sorted(set(sd["vae_lora_encoder_modules"]) ^ set(model.vae_lora_modules))
        raise AdcError(f"{name}: vae_lora_encoder_modules differs from the model's (e.g. {diff[0]!r})")
    unet_exp = {k: v for k, v in model.unet.state_dict().items() if _unet_saved(k)}
    vae_exp = {k: v for k, v in model.vae.state_dict().items() if "lora" in k}
    check_tensors(name, "state_dict_unet", sd["state_dict_unet"], unet_exp)
    check_tensors(name, "state_dict_vae", sd["state_dict_vae"], vae_exp)
    meta = any(p.is_meta for p in model.parameters())
    model.unet.load_state_dict(sd["state_dict_unet"], strict=False, assign=meta)
    model.vae.load_state_dict(sd["state_dict_vae"], strict=False, assign=meta)
    model.unet.set_adapter(list(UNET_ADAPTERS))
    model.vae.set_adapter([VAE_ADAPTER])


def adcsr_osediff_state_dict(model: OSEDiff) -> dict[str, dict[str, torch.Tensor]]:
    """AdcSR's ``osediff.pkl``: full LoRA-merged diffusers state dicts under ``unet`` and ``vae``."""
    return {"unet": merged_state_dict(model.unet), "vae": merged_state_dict(model.vae)}


def load_adcsr_osediff(model: OSEDiff, src: str | Path | dict) -> None:
    """Load AdcSR's ``osediff.pkl`` (``unet``/``vae``, LoRA already merged) strictly; merges the model's LoRA first."""
    sd, name = read_checkpoint_dict(src, "AdcSR osediff.pkl")
    for key in ("unet", "vae"):
        if key not in sd:
            hint = " (this is OSEDiff's own layout; use load_osediff_pkl)" if "state_dict_unet" in sd else ""
            raise AdcError(f"{name}: missing key {key!r}{hint}")
    if model.has_lora:
        model.merge_lora()
    meta = any(p.is_meta for p in model.parameters())
    for key, module in (("unet", model.unet), ("vae", model.vae)):
        check_tensors(name, key, sd[key], module.state_dict())
        module.load_state_dict(sd[key], strict=True, assign=meta)


def load_osediff_weights(sd_path: str | Path, osediff_pkl: str | Path | dict, ram_path: str | Path | None = None,
                         dape_path: str | Path | None = None, config: OSEDiffConfig = OSEDIFF) -> OSEDiff:
    """The released OSEDiff from local files; nothing is downloaded.

    ``sd_path``: an SD 2.1-base diffusers directory (``unet/``, ``vae/``, ``text_encoder/``).
    ``osediff_pkl``: OSEDiff's own layout (LoRA + conv_in on top of SD's weights) or AdcSR's
    variant (full merged ``unet``/``vae``: then only the text encoder is read from ``sd_path``
    and the model has no LoRA layers). ``ram_path``/``dape_path``: ``ram_swin_large_14m.pth`` and
    ``DAPE.pth`` for the prompt extractor; without ``ram_path`` there is none (prompts then come
    from ``encode_prompt``'s other sources).
    """
    from .dape import load_ram_weights
    from .sd import load_sd_components

    sd, _ = read_checkpoint_dict(osediff_pkl, "osediff.pkl")
    adcsr_layout = "state_dict_unet" not in sd and "unet" in sd and "vae" in sd
    dape = None
    if ram_path is not None:
        dape = DAPE(config.dape or DAPE_FULL)
        load_ram_weights(dape, ram_path, dape_path)
        dape.eval()
    if adcsr_layout:
        parts = load_sd_components(sd_path, ("text_encoder",))
        # On meta, then filled by assignment from the file: no random init of ~1 B weights.
        unet = build_unet(config.sd_size, "meta", **config.unet_overrides)
        vae = build_vae(config.sd_size, "meta", **config.vae_overrides)
        model = OSEDiff(unet, vae, parts["text_encoder"], dape, config, add_lora=False)
        load_adcsr_osediff(model, sd)
        left = [n for n, t in [*model.unet.named_parameters(), *model.unet.named_buffers(),
                               *model.vae.named_parameters(), *model.vae.named_buffers()] if t.is_meta]
        if left:
            raise AdcError(f"{osediff_pkl}: AdcSR layout left {left[0]!r} unset")
    else:
        parts = load_sd_components(sd_path)
        model = OSEDiff(parts["unet"], parts["vae"], parts["text_encoder"], dape, config)
        load_osediff_pkl(model, sd)
    return model.eval()
