"""Robust image reading: folder scans, mode conversion to RGB float32 in [0, 1], skipping bad files.

Why: training folders (LSDIR, DIV2K, scraped sets) contain grayscale, RGBA, palette and 16-bit
files, and now and then a truncated or mis-named one. Every reader in adc goes through
:func:`read_image` so all of them see the same RGB float32 array, and a bad file costs one
warning line instead of a crashed run.

One reader for every path (sr, evaluate, training data, calibration): :func:`decode_image`.
8-bit files give exactly ``uint8 / 255`` in float32 (pyiqa's ``imread2tensor``, so published
metrics still match); 16-bit files give ``value / 65535`` (a 16-bit and an 8-bit copy of one
picture score alike); EXIF orientation is applied; alpha is returned beside the RGB, not lost
unsaid; a float image with NaN/inf pixels, or a header past Pillow's decompression-bomb limit,
is one :class:`ImageReadError` line. Pillow reduces 16-bit-per-channel RGB(A) PNGs and TIFFs to
8 bits and cannot open float RGB TIFFs, so those go through OpenCV (``IMREAD_UNCHANGED``);
every other file goes through Pillow. Pillow's header is read first in every case, so its size
guard applies to all of them. No torch here: evaluate checks sizes before importing it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import AdcError
from ..log import get_logger

if TYPE_CHECKING:
    import torch

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


class DecodedImage(NamedTuple):
    """``rgb``: H x W x 3 float32 in [0, 1]; ``alpha``: H x W float32 in [0, 1], or None without one."""

    rgb: np.ndarray
    alpha: np.ndarray | None


def decode_image(path: str | os.PathLike) -> DecodedImage:
    """Decode ``path`` (upright after EXIF orientation) to RGB float32 in [0, 1] and its alpha, if any.

    Grayscale is replicated to three channels; palette images go through RGBA so transparency
    entries are honoured; 8-bit data is divided by 255, 16-bit data by 65535, float data is
    taken as [0, 1] and clipped. Any failure becomes an :class:`ImageReadError` naming the file.
    """
    path = Path(path)
    try:
        return _decode(path)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: too large to decode safely: {_first_line(exc).rstrip('.')} (Pillow's "
                             f"decompression-bomb guard, PIL.Image.MAX_IMAGE_PIXELS)") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
        raise ImageReadError(f"{path}: unreadable image ({type(exc).__name__}: {_first_line(exc)[:160]})") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """:func:`decode_image` without the alpha (as OpenCV's IMREAD_COLOR in AdcSR's loader, and
    pyiqa's ``convert("RGB")``): H x W x 3 float32 RGB in [0, 1]."""
    return decode_image(path).rgb


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as :func:`decode_image` will return it (EXIF rotation included), from the header only."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if _orientation(im) in (5, 6, 7, 8) else (w, h)
    except Exception:  # noqa: BLE001 - a float RGB TIFF (only OpenCV reads it), or the one line decoding gives
        return decode_image(path).rgb.shape[1::-1]


def to_chw_tensor(img: np.ndarray) -> torch.Tensor:
    """H x W x 3 float array -> contiguous 3 x H x W float32 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


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


# ----------------------------------------------------------------------------- decoding

#: EXIF orientation -> the numpy steps that make an H x W (x C) array upright (as ImageOps.exif_transpose).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _decode(path: Path) -> DecodedImage:
    with open(path, "rb") as fh:
        head = fh.read(29)
    try:
        im = Image.open(path)  # the header only; Pillow's decompression-bomb check runs here
    except UnidentifiedImageError:
        if path.suffix.lower() in (".tif", ".tiff"):  # float RGB TIFFs: Pillow cannot, OpenCV can
            return _read_cv2(path, 1)
        raise
    with im:
        if _is_png16(head) or _is_tiff16(im):
            return _read_cv2(path, _orientation(im))
        im.load()  # decode now, so truncated files fail here and not later
        im = ImageOps.exif_transpose(im) or im
        return _pil_decode(im, path)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1: upright); a PNG's eXIf after the pixels is not read (it would decode them)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        return int(im.getexif().get(0x0112) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: the pixels are still good
        return 1


def _pil_decode(im: Image.Image, path: Path) -> DecodedImage:
    mode = im.mode
    if mode.startswith("I;16"):
        return DecodedImage(_gray_to_rgb(np.asarray(im).astype(np.float32) / 65535.0), None)
    if mode == "I":  # 32-bit int container; Pillow uses it for 16-bit grayscale from some codecs
        arr = np.clip(np.asarray(im, dtype=np.float64), 0, 65535).astype(np.float32) / 65535.0
        return DecodedImage(_gray_to_rgb(arr), None)
    if mode == "F":  # float TIFFs: assumed to be in [0, 1] already
        return DecodedImage(_gray_to_rgb(_finite01(np.asarray(im, dtype=np.float32), path)), None)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"))  # RGB exactly as convert("RGB") gives it; alpha beside
        return DecodedImage(rgba[:, :, :3].astype(np.float32) / 255.0, rgba[:, :, 3].astype(np.float32) / 255.0)
    if mode != "RGB":
        im = im.convert("RGB")
    return DecodedImage(np.asarray(im, dtype=np.float32) / 255.0, None)


def _finite01(arr: np.ndarray, path: Path) -> np.ndarray:
    """A float image clipped to [0, 1]; NaN/inf pixels are refused (they would poison every mean downstream)."""
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise ImageReadError(f"{path}: non-finite input pixels ({bad} NaN or inf values in a float image)")
    return np.clip(arr, 0.0, 1.0)


def _gray_to_rgb(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2), dtype=np.float32)


# ----------------------------------------------------------------------------- 16-bit and float files (OpenCV)


def _is_png16(head: bytes) -> bool:
    """True for a 16-bit-per-sample PNG (the kind Pillow would truncate to 8 bits)."""
    if len(head) < 29 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return False
    depth, ctype = head[24], head[25]
    return depth == 16 and ctype in _PNG_CHANNELS


def _is_tiff16(im: Image.Image) -> bool:
    """True for a 16-bit RGB(A) TIFF, which Pillow opens as 8-bit RGB(A)."""
    if im.format != "TIFF" or im.mode not in ("RGB", "RGBA"):
        return False
    bits = getattr(im, "tag_v2", {}).get(258, ())
    return any(b == 16 for b in (bits if isinstance(bits, tuple) else (bits,)))


def _read_cv2(path: Path, orientation: int) -> DecodedImage:
    """A PNG/TIFF through OpenCV, keeping its precision: uint8 / 255, uint16 / 65535, float as [0, 1]."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)  # imdecode: no path-encoding surprises, one read
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise ValueError(f"OpenCV could not decode it ({'nothing' if arr is None else arr.dtype})")
    if arr.dtype.kind == "f":
        samples = _finite01(arr.astype(np.float32), path)
    else:
        samples = arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 else 255.0)
    if samples.ndim == 3 and samples.shape[2] == 1:
        samples = samples[:, :, 0]
    if orientation in _ORIENT:
        samples = _ORIENT[orientation](samples)
    if samples.ndim == 2:
        return DecodedImage(_gray_to_rgb(samples), None)
    alpha = np.ascontiguousarray(samples[:, :, -1]) if samples.shape[2] in (2, 4) else None
    if samples.shape[2] == 2:  # gray + alpha
        return DecodedImage(_gray_to_rgb(samples[:, :, 0]), alpha)
    return DecodedImage(np.ascontiguousarray(samples[:, :, 2::-1]), alpha)  # BGR(A) -> RGB
