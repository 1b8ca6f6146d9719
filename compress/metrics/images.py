"""Reading images the way pyiqa does, and listing image folders.

Why: the scores only match the published ones if pixels reach the metric exactly as
pyiqa's ``imread2tensor`` delivers them (PIL, converted to RGB, uint8 / 255 in float32).
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

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
    """1x3xHxW float32 tensor in [0, 1] (PIL -> RGB -> uint8 / 255, as pyiqa's imread2tensor)."""
    import numpy as np  # here, not at the top: listing folders must not pay for torch
    import torch

    path = Path(path)
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise AdcError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise AdcError(f"{path}: unreadable image ({type(exc).__name__}: {str(exc)[:120]})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).to(torch.float32).div(255.0)
