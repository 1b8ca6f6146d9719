"""PEFT LoRA and checkpoint helpers shared by the OSEDiff, S3Diff and DAPE zoo models.

Why a helper: the official checkpoints store LoRA tensors in peft's naming
(``<module>.lora_A.<adapter>.weight``) beside base weights that, once peft wraps a layer, live
under ``<module>.base_layer.*``. Loading plain diffusers/transformers weights into a wrapped
model, merging adapters and exporting merged weights all need the same key bookkeeping.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import AdcError
from ..io import safe_torch_load


# OSEDiff's UNet grep (osediff.py: initialize_unet), in its order; AdcSR's discriminator uses it too.
UNET_GREP: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
                              "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
UNET_ADAPTERS: tuple[str, ...] = ("default_encoder", "default_decoder", "default_others")


def sd_unet_lora_targets(unet: nn.Module) -> dict[str, list[str]]:
    """The three-adapter LoRA grep over a diffusers UNet: each weight (not bias/norm) goes to the
    adapter of the first matching pattern.

    ``down_blocks``/``conv_in`` -> default_encoder, ``up_blocks``/``conv_out`` -> default_decoder,
    anything else that matches (the mid block) -> default_others. 94/148/16 modules for SD 2.1.
    """
    out: dict[str, list[str]] = {a: [] for a in UNET_ADAPTERS}
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in UNET_GREP:
            if pattern in n:
                name = n.replace(".weight", "")
                if "down_blocks" in n or "conv_in" in n:
                    out["default_encoder"].append(name)
                elif "up_blocks" in n or "conv_out" in n:
                    out["default_decoder"].append(name)
                else:
                    out["default_others"].append(name)
                break
    return out


def _tuner_layer_type():
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every peft-wrapped layer of ``module`` by its qualified name."""
    base = _tuner_layer_type()
    return {n: m for n, m in module.named_modules() if isinstance(m, base)}


def lora_parameter_count(module: nn.Module, adapter: str | None = None) -> int:
    """Parameters of the LoRA matrices (optionally of one adapter), each tensor once."""
    seen: dict[int, torch.Tensor] = {}
    for n, p in module.named_parameters():
        if "lora_" in n and (adapter is None or f".{adapter}." in n or n.endswith(f".{adapter}")):
            seen[id(p)] = p
    return sum(p.numel() for p in seen.values())


def plain_key(key: str) -> str | None:
    """The key a wrapped parameter has in the plain model, or None for LoRA tensors."""
    if ".lora_" in key or key.startswith("lora_"):
        return None
    return key.replace(".base_layer.", ".")


def load_plain_state_dict(wrapped: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a plain (un-wrapped) state dict into the base layers of a peft-wrapped module, strictly.

    LoRA tensors are left as they are. Missing or unexpected keys and shape mismatches raise
    :class:`AdcError` naming ``source``.
    """
    target = {k: v for k, v in wrapped.state_dict().items() if plain_key(k) is not None}
    by_plain = {plain_key(k): k for k in target}
    missing = sorted(set(by_plain) - set(state))
    extra = sorted(set(state) - set(by_plain))
    if missing:
        raise AdcError(f"{source}: lacks key {missing[0]!r} ({len(missing)} missing in all)")
    if extra:
        raise AdcError(f"{source}: has unexpected key {extra[0]!r} ({len(extra)} in all)")
    new = {}
    for pk, wk in by_plain.items():
        v = state[pk]
        if tuple(v.shape) != tuple(target[wk].shape):
            raise AdcError(f"{source}: key {pk!r} has shape {tuple(v.shape)}, expected {tuple(target[wk].shape)}")
        new[wk] = v
    assign = any(p.is_meta for p in wrapped.parameters())
    wrapped.load_state_dict(new, strict=False, assign=assign)


def merge_and_unload(module: nn.Module) -> int:
    """Merge the active adapters of every peft layer into its base layer and drop the wrappers.

    In place; returns how many layers were merged. The same operation as peft's
    ``merge_and_unload`` (which diffusers models do not expose), for any ``nn.Module``.
    """
    layers = lora_layers(module)
    # Deepest first, so a wrapper inside a wrapped module is handled before its parent.
    for name in sorted(layers, key=lambda n: n.count("."), reverse=True):
        layer = layers[name]
        active = [a for a in layer.active_adapters if a in getattr(layer, "lora_A", {})]
        if active and not layer.merged:
            layer.merge(adapter_names=active)
        _set_submodule(module, name, layer.get_base_layer())
    for m in module.modules():  # forget the adapter configs, so adapters can be added again
        if "peft_config" in m.__dict__:
            del m.peft_config
        if getattr(m, "_hf_peft_config_loaded", False):
            m._hf_peft_config_loaded = False
    return len(layers)


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict ``merge_and_unload`` would leave, computed without touching ``module``.

    Each wrapped weight gets the delta of its active adapters (peft's ``get_delta_weight``), so no
    copy of the model is needed (a deepcopy of a full UNet would double its memory).
    """
    out = {plain_key(k): v.detach().clone() for k, v in module.state_dict().items() if plain_key(k) is not None}
    for name, layer in lora_layers(module).items():
        if layer.merged:
            continue
        key = f"{name}.weight"
        for adapter in layer.active_adapters:
            if adapter in getattr(layer, "lora_A", {}):
                out[key] += layer.get_delta_weight(adapter).to(out[key].dtype)
    return out


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def set_lora_b(module: nn.Module, value: float | None = None, std: float | None = None,
               generator: torch.Generator | None = None) -> None:
    """Fill every ``lora_B`` weight (a constant or normal noise): makes a fresh LoRA non-trivial in tests."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if ".lora_B." in n:
                if std is not None:
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
                else:
                    p.fill_(0.0 if value is None else value)


def add_adapter(module: nn.Module, targets: Sequence[str] | str, rank: int, name: str) -> None:
    """diffusers' ``add_adapter`` with a gaussian-init ``LoraConfig``, as OSEDiff and S3Diff call it.

    ``targets``: module names (peft's exact/suffix match) or one regex string (full match).
    """
    from peft import LoraConfig

    conf = LoraConfig(r=rank, init_lora_weights="gaussian",
                      target_modules=targets if isinstance(targets, str) else list(targets))
    with warnings.catch_warnings():
        # peft warns when a second adapter is injected; several adapters are intended here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        module.add_adapter(conf, adapter_name=name)


def read_checkpoint_dict(src: str | Path | dict, what: str) -> tuple[dict, str]:
    """A checkpoint dict (given, or read with ``safe_torch_load``) and the name to use in errors."""
    if isinstance(src, dict):
        return src, f"{what} dict"
    obj = safe_torch_load(src)
    if not isinstance(obj, dict):
        raise AdcError(f"{src}: expected a dict ({what} layout), got {type(obj).__name__}")
    return obj, str(src)


def check_tensors(name: str, field: str, given: object, expected: dict[str, torch.Tensor]) -> None:
    """``given`` must have exactly ``expected``'s keys, with tensors of the same shapes (else one-line AdcError)."""
    if not isinstance(given, dict):
        raise AdcError(f"{name}: {field!r} is a {type(given).__name__}, expected a state dict")
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing:
        raise AdcError(f"{name}: {field} lacks key {missing[0]!r} ({len(missing)} missing in all)")
    if extra:
        raise AdcError(f"{name}: {field} has unexpected key {extra[0]!r} ({len(extra)} in all)")
    for k, v in given.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(expected[k].shape):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise AdcError(f"{name}: {field}[{k!r}] has shape {shape}, expected {tuple(expected[k].shape)}")
