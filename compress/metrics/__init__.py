"""Image-quality metrics for SR evaluation.

PSNR/SSIM are adc's own, numerically matching pyiqa's Y-channel (ycbcr) versions as used by
the one-step SR papers (pyiqa, Y channel); learned metrics go through pyiqa when it and its weights are on disk.
Names are resolved lazily (PEP 562) so that command-line tools can check their input and
fail fast before torch is imported.
"""

from __future__ import annotations

from ..lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
