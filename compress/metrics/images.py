"""Reading images for the metrics, and listing image folders.

Why: the scores only match the published ones if 8-bit RGB pixels reach the metric exactly as
pyiqa's ``imread2tensor`` delivers them (uint8 / 255 in float32); :func:`load_image` uses adc's
one reader (:func:`compress.data.images.decode_image`), which gives exactly that, and also keeps
16-bit files' precision and applies EXIF orientation, where ``convert("RGB")`` clips and ignores them.
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import TYPE_CHECKING

from ..errors import AdcError

if TYPE_CHECKING:
    import torch

#: File endings taken as images when a folder is listed (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_images(folder: str | os.PathLike, role: str = "image") -> list[Path]:
    """Image files directly in ``folder``, sorted by file name; hidden files and sub-folders ignored.

    Sorted by name so listings are stable; :func:`compress.evaluate.pair_images` pairs SR with HR
    by name, and falls back to this order (with a warning) only when no name matches.
    """
    folder = Path(folder)
    if not folder.exists():
        raise AdcError(f"{role} folder not found: {folder}")
    if not folder.is_dir():
        raise AdcError(f"{role} path is not a folder: {folder}")
    files = sorted(
        (p for p in folder.iterdir()
         if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.name,
    )
    if not files:
        raise AdcError(f"{role} folder has no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...): {folder}")
    return files


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """1x3xHxW float32 tensor in [0, 1] (8-bit: uint8 / 255, as pyiqa's imread2tensor); alpha dropped."""
    return load_image_alpha(path)[0]


def load_image_alpha(path: str | os.PathLike) -> tuple[torch.Tensor, bool]:
    """(:func:`load_image`'s tensor, whether the file had an alpha channel, which the tensor leaves out)."""
    from ..data.images import decode_image, to_chw_tensor

    path = Path(path)
    if not path.exists():
        raise AdcError(f"{path}: file not found")
    img = decode_image(path)  # an ImageReadError (an AdcError) names the file and the cause
    return to_chw_tensor(img.rgb)[None], img.alpha is not None
