"""Fold a constant timestep (and optionally a fixed prompt) into the weights, exactly.

At a fixed timestep t the whole time branch is a constant: ``emb = time_embedding(time_proj(t))``
and, in each ``ResnetBlock2D``, ``temb = time_emb_proj(act(emb))`` is one vector per block.

- ``time_embedding_norm="default"`` adds it after ``conv1``: it goes into ``conv1.bias``.
- ``"scale_shift"`` applies ``norm2(h) * (1 + s) + b``: it goes into ``norm2``'s affine
  (``w' = w (1 + s)``, ``b' = b (1 + s) + shift``), so the block becomes a plain "default" one.

Either way the result equals the original at that timestep up to float rounding, and the time
modules (27.9 M of SD 2.1's 865.9 M UNet parameters) are gone. With a fixed prompt, the cross-attention
keys and values are constants too: :func:`fold_cross_attention` stores them and drops
``to_k``/``to_v`` (cheap, exact, optional; AdcSR removes cross-attention altogether instead).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdcError
from ..zoo.unet import ConditionFreeUNet
from ._common import Constant, ModuleChange, TransformRecord, count_params, describe, swap_modules, working_copy

_UNSUPPORTED_TOP = {
    "class_embedding": "a class embedding depends on class labels",
    "encoder_hid_proj": "the text input is projected first (encoder_hid_proj)",
    "time_embed_act": None,  # supported: applied to the constant
}


def _text_time(unet: nn.Module, text_time: dict | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(pooled text embeds, time ids) for an SDXL-style ``text_time`` added embedding, as tensors."""
    add = getattr(unet, "add_embedding", None)
    kind = getattr(getattr(unet, "config", None), "addition_embed_type", None)
    if add is None:
        return None
    if kind != "text_time":
        raise AdcError(f"fold_timestep: cannot fold the added embedding of addition_embed_type={kind!r} "
                       "(only SDXL's 'text_time', with constant time ids, is supported)")
    if not text_time or "time_ids" not in text_time:
        raise AdcError("fold_timestep: this UNet adds a 'text_time' embedding (SDXL-style); pass "
                       "text_time={'time_ids': [...], 'text_embeds': None (a dropped pooled prompt: zeros) or a tensor}")
    p = next(unet.parameters())
    ids = torch.as_tensor(text_time["time_ids"], dtype=p.dtype, device=p.device).reshape(1, -1)
    text = text_time.get("text_embeds")
    in_features = add.linear_1.in_features
    if text is None:  # a dropped pooled prompt is SDXL's "zeros for the empty prompt"
        width = in_features - ids.shape[1] * unet.add_time_proj.num_channels
        text = torch.zeros(1, width, dtype=p.dtype, device=p.device)
    text = torch.as_tensor(text, dtype=p.dtype, device=p.device).reshape(1, -1)
    return text, ids


def time_embedding_at(unet: nn.Module, timestep: int | float, text_time: dict | None = None) -> torch.Tensor:
    """The ``emb`` a diffusers UNet feeds its blocks at ``timestep`` (batch 1), as its forward computes it.

    ``text_time``: for an SDXL-style added embedding, ``{"time_ids": [...], "text_embeds": tensor or
    None}`` (None: the dropped pooled prompt, zeros); its embedding is added as the forward does.
    """
    p = next(unet.parameters())
    dtype = torch.float64 if isinstance(timestep, float) and p.device.type != "mps" else torch.int64
    t = torch.tensor([timestep], dtype=dtype, device=p.device)
    added = _text_time(unet, text_time)
    with torch.no_grad():
        t_emb = unet.time_proj(t).to(dtype=p.dtype)
        emb = unet.time_embedding(t_emb, None)
        if added is not None:
            text, ids = added
            time_embeds = unet.add_time_proj(ids.flatten()).reshape(1, -1)
            emb = emb + unet.add_embedding(torch.cat([text, time_embeds.to(text.dtype)], dim=-1).to(emb.dtype))
        if getattr(unet, "time_embed_act", None) is not None:
            emb = unet.time_embed_act(emb)
    return emb


def fold_timestep(unet: nn.Module, timestep: int | float = 999, text_time: dict | None = None,
                  planned: list[str] | None = None, *, inplace: bool = False
                  ) -> tuple[ConditionFreeUNet, TransformRecord]:
    """Fold the time branch of a diffusers ``UNet2DConditionModel`` at ``timestep``.

    Returns a :class:`ConditionFreeUNet` sharing the blocks (cross-attention, if any, is kept:
    call it as ``model(sample, encoder_hidden_states=...)``). An SDXL-style ``text_time`` added
    embedding folds too, given its constants (``text_time``, see :func:`time_embedding_at`).
    Refuses class embeddings, ``timestep_cond``, input centring and blocks that normalise with
    the embedding. ``planned``: the module names an analysis plan folds; they must be exactly
    the ones this call folds. ``unet`` is left unchanged (a copy is edited) unless ``inplace``.
    """
    from diffusers.models.resnet import ResnetBlock2D

    for attr in ("time_proj", "time_embedding", "down_blocks", "up_blocks"):
        if not isinstance(getattr(unet, attr, None), nn.Module):
            raise AdcError(f"fold_timestep: {type(unet).__name__} has no {attr!r}; expected a diffusers "
                           "UNet2DConditionModel with its time branch")
    for attr, why in _UNSUPPORTED_TOP.items():
        if why and getattr(unet, attr, None) is not None:
            raise AdcError(f"fold_timestep: cannot fold, {why} ({attr!r} is set)")
    cfg = getattr(unet, "config", None)
    if cfg is not None and getattr(cfg, "center_input_sample", False):
        raise AdcError("fold_timestep: center_input_sample=True is not supported by ConditionFreeUNet")
    if getattr(unet.time_embedding, "cond_proj", None) is not None:
        raise AdcError("fold_timestep: the time embedding takes a timestep_cond input (cond_proj); not constant")

    folded_names = [a for a in ("time_proj", "time_embedding", "add_time_proj", "add_embedding", "time_embed_act")
                    if isinstance(getattr(unet, a, None), nn.Module)]
    folded_names += [f"{n}.time_emb_proj" for n, m in unet.named_modules()
                     if isinstance(getattr(m, "time_emb_proj", None), nn.Module)]
    from .remove import check_planned

    check_planned("fold_timestep", folded_names, planned)
    unet = working_copy(unet, inplace)
    before = count_params(unet)
    emb = time_embedding_at(unet, timestep, text_time)
    changes: list[ModuleChange] = []
    folded = 0
    for name, m in unet.named_modules():
        if type(m).__name__ == "ResnetBlockCondNorm2D":
            raise AdcError(f"fold_timestep: {name!r} normalises with the time embedding (AdaGroupNorm); "
                           "folding it is not supported")
        proj = getattr(m, "time_emb_proj", None)
        if not isinstance(proj, nn.Module):
            continue
        if not isinstance(m, ResnetBlock2D):
            raise AdcError(f"fold_timestep: {name!r} ({type(m).__name__}) uses the time embedding in a way "
                           "this fold does not know")
        with torch.no_grad():
            t = emb if m.skip_time_act else m.nonlinearity(emb)
            temb = proj(t)[0]
            if m.time_embedding_norm == "default":
                conv = m.conv1
                before_m = describe(conv)
                if conv.bias is None:
                    conv.bias = nn.Parameter(temb.clone().to(conv.weight.dtype),
                                             requires_grad=conv.weight.requires_grad)
                else:
                    conv.bias.add_(temb.to(conv.bias.dtype))
                changes.append(ModuleChange(f"{name}.conv1", "folded", before_m, describe(conv)))
            elif m.time_embedding_norm == "scale_shift":
                norm = m.norm2
                if not (isinstance(norm, nn.GroupNorm) and norm.affine):
                    raise AdcError(f"fold_timestep: {name}.norm2 is not an affine GroupNorm; cannot take scale/shift")
                scale, shift = temb.chunk(2)
                norm.bias.mul_(1 + scale).add_(shift)
                norm.weight.mul_(1 + scale)
                m.time_embedding_norm = "default"
                changes.append(ModuleChange(f"{name}.norm2", "folded", {"time_embedding_norm": "scale_shift"},
                                            {"time_embedding_norm": "default"}))
            else:
                raise AdcError(f"fold_timestep: {name!r} has time_embedding_norm={m.time_embedding_norm!r}; "
                               "only 'default' and 'scale_shift' fold")
        changes.append(ModuleChange(f"{name}.time_emb_proj", "removed", describe(proj), describe(None)))
        m.time_emb_proj = None
        folded += 1
    for attr in ("time_proj", "time_embedding", "add_time_proj", "add_embedding", "time_embed_act"):
        if isinstance(getattr(unet, attr, None), nn.Module):
            changes.append(ModuleChange(attr, "removed", describe(getattr(unet, attr)), describe(None)))
    out = unet if isinstance(unet, ConditionFreeUNet) else ConditionFreeUNet.from_unet(unet)
    args: dict = {"timestep": timestep}
    if text_time:
        text = text_time.get("text_embeds")
        args["text_time"] = {"time_ids": [float(v) for v in torch.as_tensor(text_time["time_ids"]).flatten()],
                             "text_embeds": None if text is None else "given (folded into the biases)"}
    return out, TransformRecord("fold_timestep", args, before, count_params(out), changes,
                                {"resnets_folded": folded,
                                 "note": "cross-attention K/V for a fixed prompt: fold_cross_attention"})


def fold_cross_attention(model: nn.Module, encoder_hidden_states: torch.Tensor, *, inplace: bool = False
                         ) -> tuple[nn.Module, TransformRecord]:
    """Replace each cross-attention's ``to_k``/``to_v`` by the constant K/V of a fixed prompt.

    ``encoder_hidden_states``: (1, tokens, dim). Afterwards call the model without
    ``encoder_hidden_states``: diffusers' processor then feeds the hidden states to ``to_k``/
    ``to_v``, which ignore them and return the stored prompt K/V (expanded to the batch).
    ``model`` is left unchanged (a copy is edited) unless ``inplace``.
    """
    from diffusers.models.attention_processor import Attention

    if not torch.is_tensor(encoder_hidden_states) or encoder_hidden_states.ndim != 3 \
            or encoder_hidden_states.shape[0] != 1:
        raise AdcError("fold_cross_attention: expected encoder_hidden_states of shape (1, tokens, dim)")
    model = working_copy(model, inplace)
    before = count_params(model)
    mapping: dict[nn.Module, nn.Module] = {}
    changes = []
    for name, attn in model.named_modules():
        if not (isinstance(attn, Attention) and attn.is_cross_attention and isinstance(attn.to_k, nn.Linear)):
            continue
        ehs = encoder_hidden_states.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
        with torch.no_grad():
            if attn.norm_cross:
                ehs = attn.norm_encoder_hidden_states(ehs)
            for role in ("to_k", "to_v"):
                lin = getattr(attn, role)
                mapping[lin] = Constant(lin(ehs), expand_batch=True)
                changes.append(ModuleChange(f"{name}.{role}", "replaced", describe(lin), describe(mapping[lin])))
        if attn.norm_cross is not None:
            changes.append(ModuleChange(f"{name}.norm_cross", "removed", describe(attn.norm_cross), describe(None)))
            attn.norm_cross = None
    if not mapping:
        raise AdcError("fold_cross_attention: the model has no cross-attention left to fold")
    swap_modules(model, mapping)
    return model, TransformRecord("fold_cross_attention",
                                  {"tokens": int(encoder_hidden_states.shape[1]),
                                   "dim": int(encoder_hidden_states.shape[2])},
                                  before, count_params(model), changes)


__all__ = ["fold_timestep", "fold_cross_attention", "time_embedding_at"]
