"""Data layer: image reading, HR crop / paired datasets, and the Real-ESRGAN degradation.

Names are resolved lazily (PEP 562): ``compress.data.images`` (the one image reader) needs no
torch, so evaluate can check its images before paying for it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HRCropDataset": "datasets", "PairedFolderDataset": "datasets",
    "DegradationConfig": "degradation", "PairPool": "degradation", "RealESRGANDegradation": "degradation",
    "IMAGE_EXTENSIONS": "images", "ImageReadError": "images", "SkippedImages": "images", "list_images": "images",
    "read_image": "images", "decode_image": "images", "jpeg_pil": "jpeg", "jpeg_torch": "jpeg",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
