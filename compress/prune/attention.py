"""Attention after a width change: head count, head size and softmax temperature kept consistent.

diffusers' ``AttnProcessor2_0`` calls SDPA without ``scale=``, so the temperature silently
becomes 1/sqrt(new head size) whenever the head size shrinks, while ``attn.scale`` keeps the
old value (and the classic ``AttnProcessor`` uses ``attn.scale``). Here the choice is explicit:

- ``"sdpa"``: ``attn.scale = 1/sqrt(new head size)``: what AdcSR gets (it keeps the head count
  and runs SDPA's default), now also written into ``attn.scale`` so every processor agrees.
- ``"keep"``: ``attn.scale`` stays 1/sqrt(original head size) and a processor that passes
  ``scale=attn.scale`` to SDPA is installed where needed. Removing dead head dimensions is then
  exact, and the logits keep the magnitude the dense model was trained with.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdcError
from ._common import ModuleChange

ScalePolicy = Literal["sdpa", "keep"]


class ScaledSDPAProcessor:
    """``AttnProcessor2_0`` with ``scale=attn.scale`` passed to SDPA (no other difference)."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False, scale=attn.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """diffusers ``Attention`` modules (those with ``to_q``/``heads``), by name."""
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def attention_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Heads, head size and scale of every attention, taken before a width change."""
    out = {}
    for name, attn in attention_modules(model).items():
        inner = attn.to_q.out_features
        if inner % attn.heads:
            raise AdcError(f"{name}: {inner} query channels are not divisible by {attn.heads} heads")
        out[name] = {"heads": attn.heads, "head_dim": inner // attn.heads, "scale": float(attn.scale),
                     "scale_qk": bool(getattr(attn, "scale_qk", True))}
    return out


def sync_attention(model: nn.Module, before: dict[str, dict[str, Any]], *, keep_heads: bool,
                   scale: ScalePolicy) -> list[ModuleChange]:
    """Set ``heads``/``inner_dim``/``scale`` (and the processor if needed) from the new weights.

    ``keep_heads``: the head count is unchanged and the head size follows the width (AdcSR,
    head-dim pruning); otherwise the head size is unchanged and the count follows the width.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if scale not in ("sdpa", "keep"):
        raise AdcError(f"attention scale policy {scale!r} is not one of 'sdpa', 'keep'")
    changes = []
    for name, attn in attention_modules(model).items():
        old = before.get(name)
        if old is None:
            continue
        inner, inner_kv = attn.to_q.out_features, attn.to_k.out_features if isinstance(attn.to_k, nn.Linear) else None
        if keep_heads:
            heads = old["heads"]
            if inner % heads:
                raise AdcError(f"{name}: {inner} query channels are not divisible by its {heads} heads "
                               "(choose a width that keeps whole heads)")
            head_dim = inner // heads
        else:
            head_dim = old["head_dim"]
            if inner % head_dim:
                raise AdcError(f"{name}: {inner} query channels are not a whole number of {head_dim}-wide heads")
            heads = inner // head_dim
        if inner_kv is not None and inner_kv != inner:
            raise AdcError(f"{name}: to_k has {inner_kv} outputs but to_q has {inner}; they must match")
        new_scale = old["scale"] if (scale == "keep" or not old["scale_qk"]) else head_dim**-0.5
        attn.heads, attn.sliceable_head_dim = heads, heads
        attn.inner_dim = inner
        attn.inner_kv_dim = inner_kv if inner_kv is not None else inner
        attn.query_dim = attn.to_q.in_features
        if isinstance(attn.to_k, nn.Linear):
            attn.cross_attention_dim = attn.to_k.in_features
        if attn.to_out is not None and len(attn.to_out) and isinstance(attn.to_out[0], nn.Linear):
            attn.out_dim = attn.to_out[0].out_features
        attn.scale = new_scale
        processor_note = type(attn.processor).__name__
        if head_dim != old["head_dim"] and scale == "keep":
            if isinstance(attn.processor, AttnProcessor2_0):
                attn.set_processor(ScaledSDPAProcessor())
                processor_note = "ScaledSDPAProcessor"
            elif not isinstance(attn.processor, (AttnProcessor, ScaledSDPAProcessor)):
                raise AdcError(f"{name}: processor {type(attn.processor).__name__} may ignore attn.scale; "
                               "use scale policy 'sdpa' or the default attention processor")
        if (heads, head_dim, new_scale) != (old["heads"], old["head_dim"], old["scale"]):
            changes.append(ModuleChange(name, "attribute", dict(old),
                                        {"heads": heads, "head_dim": head_dim, "scale": new_scale,
                                         "scale_qk": old["scale_qk"], "processor": processor_note}))
    return changes


def restore_attention(model: nn.Module, changes: list[dict[str, Any]]) -> None:
    """Re-apply recorded attention attributes (used when a saved model is rebuilt)."""
    mods = attention_modules(model)
    for c in changes:
        attn = mods.get(c["name"])
        if attn is None:
            raise AdcError(f"record names attention {c['name']!r}, which the rebuilt model lacks")
        after = c["after"]
        attn.heads = attn.sliceable_head_dim = after["heads"]
        attn.inner_dim = attn.inner_kv_dim = attn.to_q.out_features
        attn.query_dim = attn.to_q.in_features
        attn.scale = after["scale"]
        if after.get("processor") == "ScaledSDPAProcessor":
            attn.set_processor(ScaledSDPAProcessor())
