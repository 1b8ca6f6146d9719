"""S3Diff (Zhang et al., 2024): SD-Turbo + degradation-guided LoRA, one step at t = 999.

LR [-1,1] -> DEResNet (blur and noise scores from the LR at its own size) -> random-Fourier
embedding -> per-block r x r ``de_mod`` matrices; bilinear x4 -> reflect pad to 64 -> VAE encoder
(+ LoRA, rank 16) -> UNet (+ LoRA, rank 32) run twice, positive and negative prompt, CFG 1.07 ->
analytic x0 -> VAE decoder -> clamp -> crop. 1326.8 M parameters at full size.

Every LoRA layer computes ``B(de_mod . A(x))``: the degradation-specific matrix of its block sits
between A and B. The layers are ordinary peft LoRA layers (official key names); the de_mod is
inserted by a forward hook on each ``lora_A`` sub-module, which mixes its r output channels. Why a
hook: peft's LoRA forward is ``base(x) + B(A(x)) * scale``, so rewriting A's output is the one
place where de_mod can enter without replacing or patching peft's (version-dependent) forward,
as the official ``my_lora_fwd`` does. A consequence: the LoRA cannot be merged into static
weights (de_mod depends on the input).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdcError
from .construct import build_module
from .lora import add_adapter, check_tensors, lora_layers, read_checkpoint_dict
from .osediff import MAX_TOKENS, empty_prompt_ids
from .sd import build_text_encoder, build_unet, build_vae, one_step_x0

# The official target lists (src/s3diff.py). The UNet list is matched by peft's name-suffix rule,
# the VAE string as a regex over the whole module name.
UNET_TARGETS: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut",
                                 "conv_out", "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj")
VAE_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"
UNET_ADAPTER, VAE_ADAPTER = "default", "vae_skip"
# The inference script's default prompts (S3Diff's my_utils/testing_utils.py argparse defaults).
POSITIVE_PROMPT = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, "
                   "and natural lighting.")
NEGATIVE_PROMPT = ("oil painting, cartoon, blur, dirty, messy, low quality, deformation, "
                   "low resolution, oversmooth")


def _scaled_kaiming_(modules: Sequence[nn.Module], scale: float) -> None:
    """BasicSR's default_init_weights: kaiming-normal weights times ``scale``, zero biases."""
    with torch.no_grad():
        for root in modules:
            for m in root.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.is_meta:
                    nn.init.kaiming_normal_(m.weight)
                    m.weight.mul_(scale)
                    if m.bias is not None:
                        m.bias.zero_()


# --------------------------------------------------------------------------------------------
# DEResNet (MM-RealSR's degradation estimator, frozen in S3Diff)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DEResNetConfig:
    num_in_ch: int = 3
    num_degradation: int = 2  # blur, noise
    num_feats: tuple[int, ...] = (64, 64, 64, 128)
    num_blocks: tuple[int, ...] = (2, 2, 2, 2)
    downscales: tuple[int, ...] = (1, 1, 2, 1)
    fc_hidden: int = 512


class ResidualBlockNoBN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class DEResNet(nn.Module):
    """One ResNet (no BN) branch per degradation; each ends in a sigmoid score. Keys as ``de_net.pth``."""

    def __init__(self, config: DEResNetConfig = DEResNetConfig()):
        super().__init__()
        c = config
        if not len(c.num_feats) == len(c.num_blocks) == len(c.downscales):
            raise AdcError("DEResNet config: num_feats, num_blocks and downscales must have the same length")
        self.config = c
        self.conv_first = nn.ModuleList(nn.Conv2d(c.num_in_ch, c.num_feats[0], 3, 1, 1)
                                        for _ in range(c.num_degradation))
        self.body = nn.ModuleList()
        n = len(c.num_feats)
        for _ in range(c.num_degradation):
            body: list[nn.Module] = []
            for s in range(n):
                body += [ResidualBlockNoBN(c.num_feats[s]) for _ in range(c.num_blocks[s])]
                if c.downscales[s] == 1:
                    if s < n - 1 and c.num_feats[s] != c.num_feats[s + 1]:
                        body.append(nn.Conv2d(c.num_feats[s], c.num_feats[s + 1], 3, 1, 1))
                elif c.downscales[s] == 2:
                    body.append(nn.Conv2d(c.num_feats[s], c.num_feats[min(s + 1, n - 1)], 3, 2, 1))
                else:
                    raise AdcError(f"DEResNet config: downscale {c.downscales[s]} is not 1 or 2")
            self.body.append(nn.Sequential(*body))
        self.fc_degree = nn.ModuleList(
            nn.Sequential(nn.Linear(c.num_feats[-1], c.fc_hidden), nn.ReLU(inplace=True), nn.Linear(c.fc_hidden, 1),
                          nn.Sigmoid())
            for _ in range(c.num_degradation))
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        _scaled_kaiming_([self.conv_first, self.body, self.fc_degree], 0.1)

    def forward(self, image01: torch.Tensor) -> torch.Tensor:
        """[0,1] LR (B,3,h,w) -> degradation scores (B, num_degradation) in (0,1)."""
        scores = []
        for i in range(self.config.num_degradation):
            feat = self.avg_pool(self.body[i](self.conv_first[i](image01))).flatten(1)
            scores.append(self.fc_degree[i](feat).squeeze(-1))
        return torch.stack(scores, dim=1)


# --------------------------------------------------------------------------------------------
# Degradation guidance: scores -> per-block de_mod matrices
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class S3DiffConfig:
    sd_size: str = "full"  # SD-Turbo = SD 2.1 architecture
    lora_rank_unet: int = 32
    lora_rank_vae: int = 16
    num_fourier: int = 64  # fixed random frequencies W
    de_dim: int = 256  # vae_de_mlp / unet_de_mlp width
    block_embedding_dim: int = 64
    block_dim: int = 64  # block_mlp output width
    num_vae_blocks: int = 6  # 4 down, mid, other
    num_unet_blocks: int = 10  # 4 down, mid, 4 up, other
    guidance_scale: float = 1.07
    timestep: int = 999
    scale: int = 4
    scaling_factor: float = 0.18215
    pad_multiple: int = 64
    sample_latent: bool = False  # S3Diff samples latent_dist; the mode is the deterministic default
    deresnet: DEResNetConfig = DEResNetConfig()


S3DIFF = S3DiffConfig()
S3DIFF_TINY = S3DiffConfig(sd_size="tiny", lora_rank_unet=4, lora_rank_vae=2, num_fourier=8, de_dim=16,
                           block_embedding_dim=8, block_dim=8,
                           deresnet=DEResNetConfig(num_feats=(8, 8, 8, 16), fc_hidden=16))


class DegradationGuidance(nn.Module):
    """Fourier embedding of the scores + block embeddings -> r x r de_mod per block (attribute names as S3Diff)."""

    def __init__(self, config: S3DiffConfig = S3DIFF):
        super().__init__()
        c = self.config = config
        in_dim = c.deresnet.num_degradation * 2 * c.num_fourier
        self.W = nn.Parameter(torch.randn(c.num_fourier), requires_grad=False)  # fixed; saved as "w"
        self.vae_de_mlp = nn.Sequential(nn.Linear(in_dim, c.de_dim), nn.ReLU(True))
        self.unet_de_mlp = nn.Sequential(nn.Linear(in_dim, c.de_dim), nn.ReLU(True))
        self.vae_block_mlp = nn.Sequential(nn.Linear(c.block_embedding_dim, c.block_dim), nn.ReLU(True))
        self.unet_block_mlp = nn.Sequential(nn.Linear(c.block_embedding_dim, c.block_dim), nn.ReLU(True))
        self.vae_fuse_mlp = nn.Linear(c.de_dim + c.block_dim, c.lora_rank_vae ** 2)
        self.unet_fuse_mlp = nn.Linear(c.de_dim + c.block_dim, c.lora_rank_unet ** 2)
        _scaled_kaiming_([self.vae_de_mlp, self.unet_de_mlp, self.vae_block_mlp, self.unet_block_mlp,
                          self.vae_fuse_mlp, self.unet_fuse_mlp], 1e-5)
        self.vae_block_embeddings = nn.Embedding(c.num_vae_blocks, c.block_embedding_dim)
        self.unet_block_embeddings = nn.Embedding(c.num_unet_blocks, c.block_embedding_dim)

    def fourier(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, D) scores -> (B, D * 2 * num_fourier): [sin, cos] of score x W x 2 pi, degradation by degradation."""
        proj = scores[..., None] * self.W[None, None, :] * 2 * math.pi
        proj = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
        return proj.flatten(1)

    @staticmethod
    def _fuse(de: torch.Tensor, blocks: torch.Tensor, fuse: nn.Module, rank: int) -> torch.Tensor:
        b, n = de.shape[0], blocks.shape[0]
        x = torch.cat([de[:, None].expand(b, n, -1), blocks[None].expand(b, n, -1)], dim=-1)
        return fuse(x).view(b, n, rank, rank)

    def forward(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) scores -> de_mod for the VAE (B, 6, rv, rv) and the UNet (B, 10, ru, ru)."""
        proj = self.fourier(scores)
        vae = self._fuse(self.vae_de_mlp(proj), self.vae_block_mlp(self.vae_block_embeddings.weight),
                         self.vae_fuse_mlp, self.config.lora_rank_vae)
        unet = self._fuse(self.unet_de_mlp(proj), self.unet_block_mlp(self.unet_block_embeddings.weight),
                          self.unet_fuse_mlp, self.config.lora_rank_unet)
        return vae, unet


def unet_block_index(name: str, num_blocks: int = 10) -> int:
    """S3Diff's block of a UNet LoRA layer: down i -> i, mid -> 4, up i -> 5 + i, other (conv_out) -> last."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks":
        return int(parts[1]) + 5
    return num_blocks - 1


def vae_block_index(name: str, num_blocks: int = 6) -> int:
    """S3Diff's block of a VAE LoRA layer: encoder down i -> i, mid -> second last, other -> last."""
    parts = name.split(".")
    if parts[1] == "down_blocks":
        return int(parts[2])
    if parts[1] == "mid_block":
        return num_blocks - 2
    return num_blocks - 1


class _DeModState:
    """The de_mod matrices of the forward pass in progress, per model part; None outside a pass."""

    def __init__(self) -> None:
        self.mats: dict[str, torch.Tensor] | None = None


def _de_mod_hook(state: _DeModState, part: str, block: int, module: nn.Module, inputs: Any,
                 output: torch.Tensor) -> torch.Tensor:
    """Mix the r channels of ``lora_A``'s output with the block's de_mod: out_r = sum_k a_k M[k, r]."""
    if state.mats is None:
        raise AdcError("S3Diff LoRA layers need degradation scores: run the S3Diff model, not its "
                       f"{part} alone (or call it inside S3Diff.modulated(...))")
    m = state.mats[part][:, block].to(output.dtype)  # (B, r, r)
    if m.shape[0] != output.shape[0]:
        raise AdcError(f"S3Diff de_mod batch {m.shape[0]} does not match the {part} batch {output.shape[0]}")
    if output.dim() == 4:  # conv: (B, r, h, w)
        return torch.einsum("bkhw,bkr->brhw", output, m)
    return torch.einsum("blk,bkr->blr", output.reshape(output.shape[0], -1, output.shape[-1]), m).reshape(
        *output.shape[:-1], m.shape[-1])


class _Modulated:
    def __init__(self, state: _DeModState, mats: dict[str, torch.Tensor]):
        self.state, self.mats = state, mats

    def __enter__(self) -> None:
        self.state.mats = self.mats

    def __exit__(self, *exc: Any) -> None:
        self.state.mats = None


class S3Diff(nn.Module):
    """One-step SR with degradation-guided LoRA: LR [-1,1] (B,3,h,w) -> SR [-1,1] (B,3,4h,4w)."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, de_net: DEResNet | None = None,
                 config: S3DiffConfig = S3DIFF):
        super().__init__()
        self.config = config
        self.timestep, self.scale, self.scaling_factor = config.timestep, config.scale, config.scaling_factor
        self.guidance_scale = config.guidance_scale
        self.de_net = de_net if de_net is not None else DEResNet(config.deresnet)
        self.guidance = DegradationGuidance(config)
        self.text_encoder = text_encoder
        self.vae = vae
        self.unet = unet
        self.tokenizer: Any = None
        self._de_state = _DeModState()
        add_adapter(self.vae, VAE_TARGETS, config.lora_rank_vae, VAE_ADAPTER)
        add_adapter(self.unet, list(UNET_TARGETS), config.lora_rank_unet, UNET_ADAPTER)
        self.vae_lora_layers = list(lora_layers(self.vae))
        self.unet_lora_layers = list(lora_layers(self.unet))
        self._hooks = []
        for part, module, adapter, index, n in (
                ("vae", self.vae, VAE_ADAPTER, vae_block_index, config.num_vae_blocks),
                ("unet", self.unet, UNET_ADAPTER, unet_block_index, config.num_unet_blocks)):
            for name, layer in lora_layers(module).items():
                hook = functools.partial(_de_mod_hook, self._de_state, part, index(name, n))
                self._hooks.append(layer.lora_A[adapter].register_forward_hook(hook))

    @classmethod
    def from_config(cls, config: S3DiffConfig = S3DIFF) -> "S3Diff":
        device = torch.get_default_device()  # the sd builders set their own; keep meta when counting
        return cls(build_unet(config.sd_size, device), build_vae(config.sd_size, device),
                   build_text_encoder(config.sd_size, device), DEResNet(config.deresnet), config)

    # ---------------------------------------------------------------- prompts
    def set_prompting(self, tokenizer: Any = None) -> None:
        """A local CLIP tokenizer, for S3Diff's fixed positive/negative prompts (or any others)."""
        self.tokenizer = tokenizer

    def encode_prompt(self, prompts: Sequence[str] | None = None,
                      token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP embeddings of ``token_ids``, or of ``prompts`` (needs the tokenizer), else of the empty prompt."""
        if token_ids is None:
            if prompts is not None:
                if self.tokenizer is None:
                    raise AdcError("text prompts need a CLIP tokenizer: call set_prompting(tokenizer=...)")
                token_ids = self.tokenizer(list(prompts), max_length=MAX_TOKENS, padding="max_length",
                                           truncation=True, return_tensors="pt").input_ids
            else:
                token_ids = empty_prompt_ids()
        return self.text_encoder(token_ids.to(next(self.text_encoder.parameters()).device))[0]

    def default_prompt_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive and negative embeddings: S3Diff's prompts with a tokenizer, the empty prompt (twice) without."""
        if self.tokenizer is not None:
            return self.encode_prompt([POSITIVE_PROMPT]), self.encode_prompt([NEGATIVE_PROMPT])
        e = self.encode_prompt()
        return e, e

    # ---------------------------------------------------------------- inference
    def modulated(self, scores: torch.Tensor) -> _Modulated:
        """Context in which the VAE/UNet LoRA layers use the de_mod of these degradation scores."""
        vae, unet = self.guidance(scores)
        return _Modulated(self._de_state, {"vae": vae, "unet": unet})

    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        return F.interpolate(lr, scale_factor=self.scale, mode="bilinear", align_corners=False).clamp(-1, 1)

    def _batch(self, emb: torch.Tensor, b: int) -> torch.Tensor:
        if emb.shape[0] == 1 and b > 1:
            emb = emb.expand(b, -1, -1)
        if emb.shape[0] != b:
            raise AdcError(f"prompt embeddings have batch {emb.shape[0]}, the LR batch is {b}")
        return emb

    def teacher_latent(self, lr: torch.Tensor, prompt_embeds: torch.Tensor | None = None,
                       negative_prompt_embeds: torch.Tensor | None = None, deg_score: torch.Tensor | None = None,
                       sample: bool | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The CFG one-step x0 latent of the (padded) x4 LR."""
        b = lr.shape[0]
        if deg_score is None:
            deg_score = self.de_net((lr + 1) / 2)  # DEResNet sees the [0,1] LR at its own size
        up = self.upscale(lr)
        h, w = up.shape[-2:]
        m = self.config.pad_multiple
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:
            up = F.pad(up, (0, pad_w, 0, pad_h), mode="reflect")
        if prompt_embeds is None or negative_prompt_embeds is None:
            pos, neg = self.default_prompt_embeds()
            prompt_embeds = pos if prompt_embeds is None else prompt_embeds
            negative_prompt_embeds = neg if negative_prompt_embeds is None else negative_prompt_embeds
        with self.modulated(deg_score):
            dist = self.vae.encode(up).latent_dist
            sample = self.config.sample_latent if sample is None else sample
            z = (dist.sample(generator) if (sample or generator is not None) else dist.mode()) * self.scaling_factor
            t = torch.tensor([self.timestep], device=z.device, dtype=torch.long)
            eps_pos = self.unet(z, t, encoder_hidden_states=self._batch(prompt_embeds, b).to(z.dtype)).sample
            eps_neg = self.unet(z, t, encoder_hidden_states=self._batch(negative_prompt_embeds, b).to(z.dtype)).sample
        eps = eps_neg + self.guidance_scale * (eps_pos - eps_neg)
        return one_step_x0(z, eps, self.timestep)

    def forward(self, lr: torch.Tensor, prompt_embeds: torch.Tensor | None = None,
                negative_prompt_embeds: torch.Tensor | None = None, deg_score: torch.Tensor | None = None,
                sample: bool | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = self.teacher_latent(lr, prompt_embeds, negative_prompt_embeds, deg_score, sample, generator)
        out = self.vae.decode(x0 / self.scaling_factor).sample.clamp(-1, 1)
        return out[..., : lr.shape[-2] * self.scale, : lr.shape[-1] * self.scale]

    def components(self) -> dict[str, nn.Module]:
        return {"de_net": self.de_net, "guidance": self.guidance, "text_encoder": self.text_encoder,
                "vae.encoder": nn.ModuleDict({"encoder": self.vae.encoder, "quant_conv": self.vae.quant_conv}),
                "unet": self.unet,
                "vae.decoder": nn.ModuleDict({"post_quant_conv": self.vae.post_quant_conv,
                                              "decoder": self.vae.decoder})}


def build_s3diff(size: str = "full", device: str | torch.device = "cpu", config: S3DiffConfig | None = None) -> S3Diff:
    if config is None:
        if size not in ("full", "tiny"):
            raise AdcError(f"model size {size!r} is not one of full, tiny")
        config = S3DIFF if size == "full" else S3DIFF_TINY
    return build_module(lambda: S3Diff.from_config(config), device)


ZOO = {"s3diff": build_s3diff}


# --------------------------------------------------------------------------------------------
# s3diff.pkl (S3Diff.save_model) and de_net.pth
# --------------------------------------------------------------------------------------------
S3DIFF_KEYS = ("unet_lora_target_modules", "vae_lora_target_modules", "rank_unet", "rank_vae", "state_dict_unet",
               "state_dict_vae", "state_dict_vae_de_mlp", "state_dict_unet_de_mlp", "state_dict_vae_block_mlp",
               "state_dict_unet_block_mlp", "state_dict_vae_fuse_mlp", "state_dict_unet_fuse_mlp", "w",
               "state_embeddings")
_MLPS = ("vae_de_mlp", "unet_de_mlp", "vae_block_mlp", "unet_block_mlp", "vae_fuse_mlp", "unet_fuse_mlp")


def _sd(module: nn.Module, keep=lambda k: True) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if keep(k)}


def s3diff_state_dict(model: S3Diff) -> dict[str, Any]:
    """``s3diff.pkl`` as S3Diff's ``save_model`` writes it."""
    g = model.guidance
    out: dict[str, Any] = {
        "unet_lora_target_modules": list(UNET_TARGETS),
        "vae_lora_target_modules": VAE_TARGETS,
        "rank_unet": model.config.lora_rank_unet,
        "rank_vae": model.config.lora_rank_vae,
        "state_dict_unet": _sd(model.unet, lambda k: "lora" in k or "conv_in" in k),
        "state_dict_vae": _sd(model.vae, lambda k: "lora" in k),
    }
    for name in _MLPS:
        out[f"state_dict_{name}"] = _sd(getattr(g, name))
    out["w"] = g.W.detach().clone()
    out["state_embeddings"] = {"state_dict_vae_block": _sd(g.vae_block_embeddings),
                               "state_dict_unet_block": _sd(g.unet_block_embeddings)}
    return out


def load_s3diff_pkl(model: S3Diff, src: str | Path | dict) -> list[str]:
    """Load ``s3diff.pkl`` (LoRA, conv_in, MLPs, W, block embeddings) into ``model``, strictly.

    Base weights (SD-Turbo) must already be in place. Returns the ignored keys: the vestigial
    pix2pix-turbo ``skip_conv`` entries S3Diff's saver may include in ``state_dict_vae``.
    """
    sd, name = read_checkpoint_dict(src, "s3diff.pkl")
    for key in S3DIFF_KEYS:
        if key not in sd:
            raise AdcError(f"{name}: missing key {key!r} (expected S3Diff's s3diff.pkl layout)")
    for key, want in (("rank_unet", model.config.lora_rank_unet), ("rank_vae", model.config.lora_rank_vae)):
        if sd[key] != want:
            raise AdcError(f"{name}: {key}={sd[key]!r}, the model has LoRA rank {want}")
    targets = sd["unet_lora_target_modules"]
    if isinstance(targets, str) or set(targets) != set(UNET_TARGETS):
        raise AdcError(f"{name}: unet_lora_target_modules {sd['unet_lora_target_modules']!r} differ from S3Diff's")
    if sd["vae_lora_target_modules"] != VAE_TARGETS:
        raise AdcError(f"{name}: vae_lora_target_modules {sd['vae_lora_target_modules']!r} differ from S3Diff's")
    vae_given = dict(sd["state_dict_vae"]) if isinstance(sd["state_dict_vae"], dict) else sd["state_dict_vae"]
    ignored = sorted(k for k in vae_given if "skip_conv" in k) if isinstance(vae_given, dict) else []
    for k in ignored:
        del vae_given[k]
    g = model.guidance
    unet_exp = {k: v for k, v in model.unet.state_dict().items() if "lora" in k or "conv_in" in k}
    vae_exp = {k: v for k, v in model.vae.state_dict().items() if "lora" in k}
    check_tensors(name, "state_dict_unet", sd["state_dict_unet"], unet_exp)
    check_tensors(name, "state_dict_vae", vae_given, vae_exp)
    for mlp in _MLPS:
        check_tensors(name, f"state_dict_{mlp}", sd[f"state_dict_{mlp}"], getattr(g, mlp).state_dict())
    emb = sd["state_embeddings"]
    if not isinstance(emb, dict) or {"state_dict_vae_block", "state_dict_unet_block"} - set(emb):
        raise AdcError(f"{name}: state_embeddings must hold state_dict_vae_block and state_dict_unet_block")
    check_tensors(name, "state_embeddings.state_dict_vae_block", emb["state_dict_vae_block"],
                   g.vae_block_embeddings.state_dict())
    check_tensors(name, "state_embeddings.state_dict_unet_block", emb["state_dict_unet_block"],
                   g.unet_block_embeddings.state_dict())
    w = sd["w"]
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(g.W.shape):
        raise AdcError(f"{name}: 'w' has shape {tuple(getattr(w, 'shape', ()))}, expected {tuple(g.W.shape)}")
    meta = any(p.is_meta for p in model.parameters())
    model.unet.load_state_dict(sd["state_dict_unet"], strict=False, assign=meta)
    model.vae.load_state_dict(vae_given, strict=False, assign=meta)
    for mlp in _MLPS:
        getattr(g, mlp).load_state_dict(sd[f"state_dict_{mlp}"], strict=True, assign=meta)
    g.vae_block_embeddings.load_state_dict(emb["state_dict_vae_block"], strict=True, assign=meta)
    g.unet_block_embeddings.load_state_dict(emb["state_dict_unet_block"], strict=True, assign=meta)
    with torch.no_grad():
        if meta:
            g.W = nn.Parameter(w.detach().clone().float(), requires_grad=False)
        else:
            g.W.copy_(w.detach())
    return ignored


def load_de_net(model: S3Diff | DEResNet, src: str | Path | dict) -> None:
    """Load ``de_net.pth`` (a plain DEResNet state dict) strictly."""
    net = model.de_net if isinstance(model, S3Diff) else model
    sd, name = read_checkpoint_dict(src, "de_net.pth")
    check_tensors(name, "DEResNet state dict", sd, net.state_dict())
    net.load_state_dict(sd, strict=True, assign=any(p.is_meta for p in net.parameters()))


def load_s3diff_weights(sd_turbo_path: str | Path, s3diff_pkl: str | Path | dict, de_net_path: str | Path | dict,
                        config: S3DiffConfig = S3DIFF) -> S3Diff:
    """The released S3Diff from local files (nothing is downloaded): an SD-Turbo diffusers directory
    (``unet/``, ``vae/``, ``text_encoder/``), ``s3diff.pkl`` and ``de_net.pth``."""
    from .sd import load_sd_components

    parts = load_sd_components(sd_turbo_path)
    model = S3Diff(parts["unet"], parts["vae"], parts["text_encoder"], DEResNet(config.deresnet), config)
    load_s3diff_pkl(model, s3diff_pkl)
    load_de_net(model, de_net_path)
    return model.eval()
