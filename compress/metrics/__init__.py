"""Image-quality metrics for SR evaluation.

PSNR/SSIM are adc's own, numerically matching pyiqa's Y-channel (ycbcr) versions as used by
the one-step SR papers (pyiqa, Y channel); learned metrics go through pyiqa when it and its weights are on disk.
Names are resolved lazily (PEP 562) so that command-line tools can check their input and
fail fast before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IMAGE_SUFFIXES": "images",
    "list_images": "images",
    "load_image": "images",
    "LEARNED_METRICS": "learned",
    "open_learned_metrics": "learned",
    "parse_metrics_log": "logs",
    "psnr_y": "psnr_ssim",
    "rgb_to_y": "psnr_ssim",
    "ssim_y": "psnr_ssim",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
