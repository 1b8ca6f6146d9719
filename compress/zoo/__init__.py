"""The model zoo: every model built from its config, on any device, never downloaded.

``build(name, size, device)`` gives a random-init model (``device="meta"`` for counting
only); each model's module has the loaders for its official checkpoint layout.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import AdcError
from .adcsr import build_adcsr
from .sd import build_text_encoder, build_unet, build_vae

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "sd21-unet": build_unet,
    "sd21-vae": build_vae,
    "sd21-text-encoder": build_text_encoder,
    "adcsr": build_adcsr,
}


def register(name: str, builder: Callable[..., nn.Module]) -> None:
    _REGISTRY[name] = builder


def available() -> list[str]:
    _load_optional()
    return sorted(_REGISTRY)


def build(name: str, size: str = "full", device: str | torch.device = "cpu") -> nn.Module:
    """Build zoo model ``name`` ("full" or "tiny" widths) with random init on ``device``."""
    _load_optional()
    if name not in _REGISTRY:
        raise AdcError(f"unknown model {name!r}; the zoo has {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](size=size, device=device)


def _load_optional() -> None:
    """Register the pipelines defined in their own modules (imported lazily: they pull transformers/peft)."""
    for mod in ("osediff", "s3diff"):
        try:
            module = __import__(f"{__name__}.{mod}", fromlist=["ZOO"])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(mod):
                continue
            raise
        for name, builder in getattr(module, "ZOO", {}).items():
            _REGISTRY.setdefault(name, builder)
