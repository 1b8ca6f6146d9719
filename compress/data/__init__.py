"""Data layer: image reading, HR crop / paired datasets, and the Real-ESRGAN degradation.

Names are resolved lazily (PEP 562): ``compress.data.images`` (the one image reader) needs no
torch, so evaluate can check its images before paying for it.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "HRCropDataset": "datasets", "PairedFolderDataset": "datasets",
    "DegradationConfig": "degradation", "PairPool": "degradation", "RealESRGANDegradation": "degradation",
    "IMAGE_EXTENSIONS": "images", "ImageReadError": "images", "SkippedImages": "images", "list_images": "images",
    "read_image": "images", "decode_image": "images", "jpeg_pil": "jpeg", "jpeg_torch": "jpeg",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
