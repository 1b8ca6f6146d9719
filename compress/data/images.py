"""Robust image reading: folder scans, mode conversion to RGB float32 in [0, 1], skipping bad files.

Why: training folders (LSDIR, DIV2K, scraped sets) contain grayscale, RGBA, palette and 16-bit
files, and now and then a truncated or mis-named one. Every reader in adc goes through
:func:`read_image` so all of them see the same RGB float32 array, and a bad file costs one
warning line instead of a crashed run.

16-bit PNGs: Pillow reduces 16-bit-per-channel RGB(A) PNGs to 8 bits, so those are read with
OpenCV (``cv2.imread(..., IMREAD_UNCHANGED)``, libpng underneath), which keeps their precision
(value / 65535); every other file goes through Pillow.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import AdcError
from ..log import get_logger

logger = get_logger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


class ImageReadError(AdcError):
    """A file that cannot be decoded as an image (the message names the file and the cause)."""


def list_images(root: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` (extension matched case-insensitively), sorted by relative path.

    Sorting by the path relative to ``root`` makes the order identical on every machine, which
    paired datasets and seeded crops rely on.
    """
    root = Path(root)
    if not root.exists():
        raise AdcError(f"{root}: image folder not found")
    if not root.is_dir():
        raise AdcError(f"{root}: expected a folder of images, got a file")
    pattern = "**/*" if recursive else "*"
    found = [p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` to an H x W x 3 float32 RGB array in [0, 1].

    Grayscale is replicated to three channels; alpha is dropped (as OpenCV's IMREAD_COLOR does in
    AdcSR's loader); palette images go through RGBA so transparency entries are honoured; 16-bit
    data is divided by 65535; EXIF orientation is applied. Any decoding failure becomes an
    :class:`ImageReadError`.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(29)
        if _is_png16(head):
            return _read_png16(path)
        with Image.open(path) as im:
            im.load()  # decode now, so truncated files fail here and not later
            im = ImageOps.exif_transpose(im) or im
            return _pil_to_rgb_float(im)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ImageReadError(f"{path}: unreadable image ({type(exc).__name__}: {msg[:160]})") from None


def to_chw_tensor(img: np.ndarray) -> torch.Tensor:
    """H x W x 3 float array -> contiguous 3 x H x W float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))


class SkippedImages:
    """Record of unreadable files: each one is logged once (one line) and counted.

    Datasets own one of these, so the count is per dataset and per process (DataLoader workers
    keep their own copies).
    """

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def record(self, path: str | os.PathLike, reason: str) -> None:
        key = str(path)
        if key in self._reasons:
            return
        self._reasons[key] = reason
        logger.warning("skipping unreadable image: %s", reason.replace("\n", " "))

    @property
    def count(self) -> int:
        return len(self._reasons)

    @property
    def paths(self) -> list[str]:
        return list(self._reasons)

    def __contains__(self, path: object) -> bool:
        return str(path) in self._reasons


def try_read_image(path: str | os.PathLike, skipped: SkippedImages) -> np.ndarray | None:
    """:func:`read_image`, or ``None`` after recording the failure in ``skipped``."""
    if path in skipped:
        return None
    try:
        return read_image(path)
    except ImageReadError as exc:
        skipped.record(path, str(exc))
        return None


# ----------------------------------------------------------------------------- Pillow modes


def _pil_to_rgb_float(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float32) / 65535.0
        return _gray_to_rgb(arr)
    if mode == "I":  # 32-bit int container; Pillow uses it for 16-bit grayscale from some codecs
        arr = np.clip(np.asarray(im, dtype=np.float64), 0, 65535).astype(np.float32) / 65535.0
        return _gray_to_rgb(arr)
    if mode == "F":  # float TIFFs: assumed to be in [0, 1] already
        return _gray_to_rgb(np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0))
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.float32) / 255.0


def _gray_to_rgb(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2), dtype=np.float32)


# ----------------------------------------------------------------------------- 16-bit PNG


def _is_png16(head: bytes) -> bool:
    """True for a 16-bit-per-sample PNG (the kind Pillow would truncate to 8 bits)."""
    if len(head) < 29 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return False
    depth, ctype = head[24], head[25]
    return depth == 16 and ctype in _PNG_CHANNELS


def _read_png16(path: Path) -> np.ndarray:
    """A 16-bit PNG (gray, gray+alpha, RGB, RGBA) as RGB float32 / 65535, through OpenCV."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)  # imdecode: no path-encoding surprises, one read
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        raise ValueError("OpenCV could not decode it as a 16-bit PNG")
    samples = arr.astype(np.float32) / 65535.0
    if samples.ndim == 2:
        return _gray_to_rgb(samples)
    if samples.shape[2] == 2:  # gray + alpha: drop alpha
        return _gray_to_rgb(samples[:, :, 0])
    return np.ascontiguousarray(samples[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped
