"""DAPE, OSEDiff's prompt extractor: the RAM Swin-L (384 px) tagging model plus the DAPE LoRA.

Built from transformers modules (``SwinModel`` backbone, BERT layers for the tagging head and
RAM's caption modules) with RAM's exact parameter shapes: 470.93 M parameters at full size,
LoRA 1.78 M, tag path 212.7 M. What is where, and why it is all built:

* ``visual_encoder``: Swin-L, embed 192, depths 2/2/18/2, heads 6/12/24/48, window 12 (195.2 M).
  Its output tokens, with the average-pooled token in front, go through ``image_proj`` (1536->512).
* ``tagging_head``: RAM's Query2Label decoder, 2 BERT layers *without* embeddings or
  self-attention; 4585 label queries (``label_embed``, 512 -> ``wordvec_proj`` -> 768, ReLU)
  cross-attend to the image tokens; ``fc`` gives one logit per tag. This is the tag path.
* ``tag_encoder`` (12-layer BERT with 512-wide cross-attention) and ``text_decoder`` (12-layer
  BERT LM head) are RAM's captioning modules. Tag inference never runs them, but RAM's checkpoint
  holds them and RAM ties ``tag_encoder``'s two lowest layers to the tagging head, so they are
  part of the model OSEDiff loads and of its 470.93 M parameters (``caption_modules=False`` drops them).
* LoRA (``loralib`` in RAM, peft here, rank 8, alpha 1): query+value of every Swin attention and
  query+key of every BERT attention (self and cross, all three BERTs).

:func:`load_ram_weights` maps ``ram_swin_large_14m.pth`` + ``DAPE.pth`` (RAM's own Swin naming,
fused ``qkv``, loralib tensors) onto this layout; :func:`official_state_dicts` writes it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdcError
from ..io import safe_torch_load
from .construct import build_module

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ADAPTER = "default"


@dataclass(frozen=True)
class DAPEConfig:
    """RAM Swin-L 384 + DAPE LoRA. Defaults are the official sizes (RAM's swin/med/q2l configs)."""

    image_size: int = 384
    patch_size: int = 4
    swin_embed_dim: int = 192
    swin_depths: tuple[int, ...] = (2, 2, 18, 2)
    swin_heads: tuple[int, ...] = (6, 12, 24, 48)
    swin_window: int = 12
    joint_dim: int = 512  # image_proj output = label_embed width = cross-attention input width
    num_classes: int = 4585
    bert_hidden: int = 768
    bert_intermediate: int = 3072
    bert_vocab: int = 30524  # bert-base-uncased + RAM's [DEC] and [ENC] tokens
    bert_max_positions: int = 512
    text_layers: int = 12  # tag_encoder and text_decoder depth
    text_heads: int = 12
    head_layers: int = 2  # tagging head depth (= tag_encoder layers tied to it)
    head_heads: int = 4
    lora_rank: int = 8
    lora_alpha: int = 1
    caption_modules: bool = True
    threshold: float = 0.68

    @property
    def vision_width(self) -> int:
        return self.swin_embed_dim * 2 ** (len(self.swin_depths) - 1)


DAPE_FULL = DAPEConfig()
# Every stage keeps a resolution >= the window (16, 8, 4, 2 tokens with window 2), as at full size.
DAPE_TINY = DAPEConfig(image_size=64, swin_embed_dim=8, swin_depths=(2, 2, 2, 2), swin_heads=(1, 2, 2, 4),
                       swin_window=2, joint_dim=16, num_classes=12, bert_hidden=16, bert_intermediate=32,
                       bert_vocab=40, bert_max_positions=16, text_layers=2, text_heads=2, head_layers=2,
                       head_heads=2, lora_rank=2)


def _bert_config(cfg: DAPEConfig, layers: int, heads: int):
    from transformers import BertConfig

    # is_decoder: transformers only builds cross-attention layers in decoder mode; the flag has no
    # parameters and the tag path (the only one run) never uses BERT self-attention.
    return BertConfig(vocab_size=cfg.bert_vocab, hidden_size=cfg.bert_hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=cfg.bert_intermediate, hidden_act="gelu",
                      max_position_embeddings=cfg.bert_max_positions, layer_norm_eps=1e-12,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      is_decoder=True, add_cross_attention=True, attn_implementation="sdpa")


def _cross_inner(attention: nn.Module) -> nn.Module:
    """The module holding query/key/value of a transformers ``BertAttention``."""
    return attention.self


def _widen_cross_attention(layer: nn.Module, encoder_width: int) -> None:
    """RAM's cross-attention reads ``encoder_width``-wide image tokens (transformers assumes hidden size)."""
    inner = _cross_inner(layer.crossattention)
    hidden = inner.key.out_features
    inner.key = nn.Linear(encoder_width, hidden)
    inner.value = nn.Linear(encoder_width, hidden)


class WordPositionEmbeddings(nn.Module):
    """RAM's BERT embeddings: word + absolute position, LayerNorm, dropout; no token types.

    Replaces transformers' ``BertEmbeddings`` (which adds a token-type table RAM does not have);
    accepts the keyword arguments transformers passes.
    """

    def __init__(self, word_embeddings: nn.Embedding, position_embeddings: nn.Embedding,
                 layer_norm: nn.LayerNorm, dropout: nn.Module):
        super().__init__()
        self.word_embeddings = word_embeddings
        self.position_embeddings = position_embeddings
        self.LayerNorm = layer_norm
        self.dropout = dropout

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, past_key_values_length: int = 0,
                cache_length: int = 0, **_: Any) -> torch.Tensor:
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        start = past_key_values_length or cache_length
        if position_ids is None:
            position_ids = torch.arange(start, start + x.shape[1], device=x.device)[None]
        return self.dropout(self.LayerNorm(x + self.position_embeddings(position_ids)))


def _ram_embeddings(bert_model: nn.Module) -> None:
    e = bert_model.embeddings
    bert_model.embeddings = WordPositionEmbeddings(e.word_embeddings, e.position_embeddings, e.LayerNorm, e.dropout)


class CrossOnlyLayer(nn.Module):
    """A BERT layer of RAM's tagging head: cross-attention + feed-forward, no self-attention."""

    def __init__(self, crossattention: nn.Module, intermediate: nn.Module, output: nn.Module):
        super().__init__()
        self.crossattention = crossattention
        self.intermediate = intermediate
        self.output = output

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        h = self.crossattention(queries, encoder_hidden_states=image_tokens)[0]
        return self.output(self.intermediate(h), h)


class _LayerStack(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TaggingHead(nn.Module):
    """RAM's image-tag recognition decoder; keys ``encoder.layer.N.*`` as in RAM's checkpoint."""

    def __init__(self, cfg: DAPEConfig):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer

        bert_cfg = _bert_config(cfg, cfg.head_layers, cfg.head_heads)
        layers = []
        for _ in range(cfg.head_layers):
            full = BertLayer(bert_cfg)
            _widen_cross_attention(full, cfg.joint_dim)
            layers.append(CrossOnlyLayer(full.crossattention, full.intermediate, full.output))
        self.encoder = _LayerStack(layers)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer:
            queries = layer(queries, image_tokens)
        return queries


def _tie_parameters(src: nn.Module, dst: nn.Module) -> None:
    """Make ``dst`` use ``src``'s weight/bias everywhere (RAM's tie_encoder_decoder_weights: LoRA stays separate)."""
    dst_modules = dict(dst.named_modules())
    for name, m in src.named_modules():
        if name not in dst_modules:
            continue
        d = dst_modules[name]
        for pname in ("weight", "bias"):
            p = m._parameters.get(pname) if hasattr(m, "_parameters") else None
            if p is not None and pname in d._parameters:
                if d._parameters[pname].shape != p.shape:
                    raise AdcError(f"cannot tie {name}.{pname}: shapes {tuple(p.shape)} "
                                   f"and {tuple(d._parameters[pname].shape)}")
                d._parameters[pname] = p


def swin_block_parts(block: nn.Module) -> dict[str, nn.Module]:
    """The roles inside a transformers Swin block, whatever this transformers version calls them.

    transformers 5 names them ``attention.{q,k,v,o}_proj`` / ``mlp.fc1``; 4.x used
    ``attention.self.{query,key,value}`` / ``attention.output.dense`` / ``intermediate.dense``.
    """
    att = block.attention

    def first(*paths: str) -> nn.Module:
        for path in paths:
            try:
                return block.get_submodule(path)
            except AttributeError:
                continue
        raise AdcError(f"unsupported transformers Swin layout: none of {paths} exists")

    parts = {
        "q": first("attention.q_proj", "attention.self.query"),
        "k": first("attention.k_proj", "attention.self.key"),
        "v": first("attention.v_proj", "attention.self.value"),
        "o": first("attention.o_proj", "attention.output.dense"),
        "norm1": first("layernorm_before"),
        "norm2": first("layernorm_after"),
        "fc1": first("mlp.fc1", "intermediate.dense"),
        "fc2": first("mlp.fc2", "output.dense"),
    }
    owners = [m for m in att.modules() if "relative_position_bias_table" in m._parameters]
    if len(owners) != 1:
        raise AdcError("unsupported transformers Swin layout: no unique relative_position_bias_table")
    parts["rpb"] = owners[0]
    return parts


class DAPE(nn.Module):
    """RAM Swin-L tagging model with the DAPE LoRA; ``forward`` = tag logits for normalised 384 px images."""

    def __init__(self, config: DAPEConfig = DAPE_FULL):
        super().__init__()
        from transformers import SwinConfig, SwinModel

        self.config = cfg = config
        swin_cfg = SwinConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
                              embed_dim=cfg.swin_embed_dim, depths=list(cfg.swin_depths),
                              num_heads=list(cfg.swin_heads), window_size=cfg.swin_window, mlp_ratio=4.0,
                              qkv_bias=True, hidden_act="gelu", use_absolute_embeddings=False,
                              drop_path_rate=0.1, layer_norm_eps=1e-5)
        self.visual_encoder = SwinModel(swin_cfg, add_pooling_layer=True)
        self.image_proj = nn.Linear(cfg.vision_width, cfg.joint_dim)
        self.label_embed = nn.Parameter(torch.zeros(cfg.num_classes, cfg.joint_dim))
        self.wordvec_proj = (nn.Linear(cfg.joint_dim, cfg.bert_hidden) if cfg.bert_hidden != cfg.joint_dim
                             else nn.Identity())
        self.tagging_head = TaggingHead(cfg)
        self.fc = nn.Linear(cfg.bert_hidden, 1)
        if cfg.caption_modules:
            from transformers import BertLMHeadModel, BertModel

            text_cfg = _bert_config(cfg, cfg.text_layers, cfg.text_heads)
            self.tag_encoder = BertModel(text_cfg, add_pooling_layer=False)
            for layer in self.tag_encoder.encoder.layer:
                _widen_cross_attention(layer, cfg.joint_dim)
            _ram_embeddings(self.tag_encoder)
            self.text_decoder = BertLMHeadModel(text_cfg)
            _ram_embeddings(self.text_decoder.bert)  # keeps the word-embedding / LM-head tie
            for i in range(min(cfg.head_layers, cfg.text_layers)):
                _tie_parameters(self.tagging_head.encoder.layer[i], self.tag_encoder.encoder.layer[i])
        self.register_buffer("class_threshold", torch.full((cfg.num_classes,), cfg.threshold), persistent=False)
        self._add_lora()

    # ---------------------------------------------------------------- LoRA
    def lora_target_names(self) -> list[str]:
        names = {id(m): n for n, m in self.named_modules()}
        targets = []
        for stage in self.visual_encoder.encoder.layers:
            for block in stage.blocks:
                parts = swin_block_parts(block)
                targets += [names[id(parts["q"])], names[id(parts["v"])]]
        berts = [self.tagging_head] + ([self.tag_encoder, self.text_decoder] if self.config.caption_modules else [])
        for bert in berts:
            for m in bert.modules():
                if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value")):
                    targets += [names[id(m.query)], names[id(m.key)]]
        return targets

    def _add_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        conf = LoraConfig(r=self.config.lora_rank, lora_alpha=self.config.lora_alpha, lora_dropout=0.0,
                          target_modules=self.lora_target_names())
        inject_adapter_in_model(conf, self, adapter_name=ADAPTER)

    # ---------------------------------------------------------------- inference
    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """[0,1] RGB (B,3,H,W) -> resized to image_size and ImageNet-normalised, as OSEDiff feeds RAM."""
        s = self.config.image_size
        x = F.interpolate(image, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Swin tokens with the average-pooled token first, projected to the joint width."""
        out = self.visual_encoder(pixel_values=pixel_values)
        tokens = torch.cat([out.pooler_output[:, None], out.last_hidden_state], dim=1)
        return self.image_proj(tokens)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised (B,3,image_size,image_size) -> tag logits (B, num_classes)."""
        img = self.image_embeds(pixel_values)
        queries = F.relu(self.wordvec_proj(self.label_embed))
        queries = queries.unsqueeze(0).expand(img.shape[0], -1, -1)
        return self.fc(self.tagging_head(queries, img)).squeeze(-1)

    def tag_path(self) -> nn.ModuleDict:
        """The modules the tag logits use (for per-component reports)."""
        return nn.ModuleDict({"visual_encoder": self.visual_encoder, "image_proj": self.image_proj,
                              "wordvec_proj": self.wordvec_proj, "tagging_head": self.tagging_head,
                              "fc": self.fc})

    def tag_path_parameters(self) -> int:
        from .construct import count_parameters

        return count_parameters(self.tag_path()) + self.label_embed.numel()

    @torch.no_grad()
    def generate_tags(self, image01: torch.Tensor, tag_list: Sequence[str], exclude: Sequence[int] = ()) -> list[str]:
        """[0,1] images -> one ", "-joined tag string per image (RAM's per-class thresholds)."""
        if len(tag_list) != self.config.num_classes:
            raise AdcError(f"tag list has {len(tag_list)} entries, the model has {self.config.num_classes} classes")
        dtype = next(self.visual_encoder.parameters()).dtype  # the model may run in bf16/fp16 (distill.frozen_dtype)
        probs = torch.sigmoid(self(self.preprocess(image01.float()).to(dtype)).float())  # resize in fp32
        hits = probs > self.class_threshold.to(probs.device)
        if exclude:
            hits[:, list(exclude)] = False
        return [", ".join(tag_list[i] for i in row.nonzero().flatten().tolist()) for row in hits]

    def load_class_thresholds(self, path: str | Path, max_threshold: float = 0.9, add: float = 0.0) -> None:
        """RAM's ``ram_tag_list_threshold.txt``: one float a line; values <= max get ``min(v + add, max)``."""
        path = Path(path)
        try:
            values = [float(s) for s in path.read_text(encoding="utf-8").split()]
        except (OSError, ValueError) as exc:
            raise AdcError(f"{path}: not a list of thresholds ({exc})") from None
        if len(values) != self.config.num_classes:
            raise AdcError(f"{path}: {len(values)} thresholds, expected {self.config.num_classes}")
        t = torch.tensor([v if v > max_threshold else min(v + add, max_threshold) for v in values])
        self.class_threshold.copy_(t.to(self.class_threshold))


def build_dape(size: str = "full", device: str | torch.device = "cpu", config: DAPEConfig | None = None) -> DAPE:
    if config is None:
        if size not in ("full", "tiny"):
            raise AdcError(f"model size {size!r} is not one of full, tiny")
        config = DAPE_FULL if size == "full" else DAPE_TINY
    return build_module(lambda: DAPE(config), device)


def load_tag_list(path: str | Path) -> list[str]:
    """RAM's ``ram_tag_list.txt``: one English tag a line."""
    path = Path(path)
    if not path.is_file():
        raise AdcError(f"{path}: tag list not found")
    return path.read_text(encoding="utf-8").splitlines()


# --------------------------------------------------------------------------------------------
# RAM's checkpoint layout
# --------------------------------------------------------------------------------------------
# ram_swin_large_14m.pth: {"model": RAM state dict}; RAM's own Swin (fused qkv, attn.proj,
# mlp.fc1/fc2, norm1/norm2, patch_embed, final norm). DAPE.pth: the RAMLora state dict read with
# strict=False; loralib names ``<layer>.lora_A`` / ``.lora_B`` (Swin: one MergedLinear per qkv with
# q and v enabled, so lora_A is (2r, C) and lora_B (2C, r), grouped q then v).
_SKIP_SUFFIXES = ("relative_position_index", "attn_mask", "position_ids")


def ram_key_table(model: DAPE) -> dict[str, list[str]]:
    """RAM checkpoint key -> our keys, concatenated along dim 0 in this order (fused qkv splits in 2-3)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = {id(m): n for n, m in model.named_modules()}

    def w(mod: nn.Module, leaf: str) -> str:
        name = names[id(mod)]
        if isinstance(mod, BaseTunerLayer):
            if leaf in ("lora_A", "lora_B"):
                return f"{name}.{leaf}.{ADAPTER}.weight"
            return f"{name}.base_layer.{leaf}"
        return f"{name}.{leaf}"

    table: dict[str, list[str]] = {}
    ve = model.visual_encoder
    pe = ve.embeddings
    for leaf in ("weight", "bias"):
        table[f"visual_encoder.patch_embed.proj.{leaf}"] = [w(pe.patch_embeddings.projection, leaf)]
        table[f"visual_encoder.patch_embed.norm.{leaf}"] = [w(pe.norm, leaf)]
        table[f"visual_encoder.norm.{leaf}"] = [w(ve.layernorm, leaf)]
    for i, stage in enumerate(ve.encoder.layers):
        for j, block in enumerate(stage.blocks):
            p = swin_block_parts(block)
            pre = f"visual_encoder.layers.{i}.blocks.{j}."
            for leaf in ("weight", "bias"):
                table[pre + f"attn.qkv.{leaf}"] = [w(p["q"], leaf), w(p["k"], leaf), w(p["v"], leaf)]
                table[pre + f"attn.proj.{leaf}"] = [w(p["o"], leaf)]
                table[pre + f"norm1.{leaf}"] = [w(p["norm1"], leaf)]
                table[pre + f"norm2.{leaf}"] = [w(p["norm2"], leaf)]
                table[pre + f"mlp.fc1.{leaf}"] = [w(p["fc1"], leaf)]
                table[pre + f"mlp.fc2.{leaf}"] = [w(p["fc2"], leaf)]
            table[pre + "attn.qkv.lora_A"] = [w(p["q"], "lora_A"), w(p["v"], "lora_A")]
            table[pre + "attn.qkv.lora_B"] = [w(p["q"], "lora_B"), w(p["v"], "lora_B")]
            table[pre + "attn.relative_position_bias_table"] = [f"{names[id(p['rpb'])]}.relative_position_bias_table"]
        if stage.downsample is not None:
            ds = stage.downsample
            table[f"visual_encoder.layers.{i}.downsample.reduction.weight"] = [w(ds.reduction, "weight")]
            for leaf in ("weight", "bias"):
                table[f"visual_encoder.layers.{i}.downsample.norm.{leaf}"] = [w(ds.norm, leaf)]
    # Everything else already has RAM's names, less peft's base_layer / adapter parts.
    for key in model.state_dict():
        if key.startswith("visual_encoder."):
            continue
        ram = key.replace(".base_layer.", ".")
        for ab in ("lora_A", "lora_B"):
            ram = ram.replace(f".{ab}.{ADAPTER}.weight", f".{ab}")
        table.setdefault(ram, []).append(key)
    return table


def _is_lora_key(ram_key: str) -> bool:
    return ram_key.endswith((".lora_A", ".lora_B"))


def _unwrap(obj: Any, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "params" in obj and isinstance(obj["params"], dict):
        obj = obj["params"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdcError(f"{name}: expected a RAM state dict (optionally under 'model'), got {type(obj).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_ram_weights(model: DAPE, ram: str | Path | dict | None = None,
                     dape: str | Path | dict | None = None) -> list[str]:
    """Load ``ram_swin_large_14m.pth`` (base) and ``DAPE.pth`` (LoRA, or a full RAMLora state dict).

    Without ``dape`` the LoRA is zeroed, giving plain RAM (what OSEDiff's training prompts use).
    Every base tensor must come from one of the two files; shapes must match (RAM's relative
    position tables are not interpolated: the window must be 12 as in RAM's 384 px Swin-L).
    Returns the checkpoint keys that have no place in the model (RAM's loader ignores them too).
    """
    src: dict[str, torch.Tensor] = {}
    for obj in (ram, dape):
        if obj is None:
            continue
        name = str(obj) if not isinstance(obj, dict) else "RAM state dict"
        sd = _unwrap(obj if isinstance(obj, dict) else safe_torch_load(obj), name)
        src.update({k.replace("vision_multi", "tagging_head"): v for k, v in sd.items()})
    if not src:
        raise AdcError("no RAM weights given (expected ram_swin_large_14m.pth and/or DAPE.pth)")
    table = ram_key_table(model)
    expected = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    missing = []
    for ram_key, ours in table.items():
        if ram_key not in src:
            if not (_is_lora_key(ram_key) and dape is None):
                missing.append(ram_key)
            continue
        t = src[ram_key]
        sizes = [expected[k].shape[0] for k in ours]
        if t.shape[0] != sum(sizes) or any(tuple(t.shape[1:]) != tuple(expected[k].shape[1:]) for k in ours):
            want = (sum(sizes), *expected[ours[0]].shape[1:])
            raise AdcError(f"RAM key {ram_key!r} has shape {tuple(t.shape)}, the model expects {tuple(want)}")
        for k, part in zip(ours, torch.split(t, sizes, dim=0), strict=True):
            new[k] = part.contiguous()
    if missing:
        raise AdcError(f"RAM/DAPE weights lack key {missing[0]!r} ({len(missing)} missing in all)")
    unused = sorted(k for k in src if k not in table and not k.endswith(_SKIP_SUFFIXES))
    model.load_state_dict(new, strict=False, assign=any(p.is_meta for p in model.parameters()))
    if dape is None:
        from .lora import set_lora_b

        set_lora_b(model, 0.0)
    return unused


def official_state_dicts(model: DAPE) -> tuple[dict, dict]:
    """(``ram_swin_large_14m.pth``, ``DAPE.pth``) contents in RAM's layout: base weights, LoRA weights."""
    sd = model.state_dict()
    base: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    for ram_key, ours in ram_key_table(model).items():
        t = torch.cat([sd[k] for k in ours], dim=0) if len(ours) > 1 else sd[ours[0]]
        (lora if _is_lora_key(ram_key) else base)[ram_key] = t.detach().clone()
    return {"model": base}, lora
