"""Calibration and held-out LR inputs for int8 quantization, made from training HR images.

Why from training HR: activation ranges must be set on images like the ones the model will see,
and the eval pairs must stay unseen by every stage (the quantized file is scored on them later).
Each input is an HR crop of ``scale * lr`` pixels downscaled by ``scale`` (bicubic, antialiased):
the clean LR that :class:`compress.data.PairedFolderDataset`'s bicubic pairs give, not the
Real-ESRGAN degradation (its noise and JPEG would only widen the ranges a little; measuring that
is left to a run that needs it). The files are split first, so the held-out check never runs on
a file that set a range.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import AdcError

__all__ = ["CalibrationSet", "calibration_set"]


@dataclass
class CalibrationSet:
    """LR inputs (each (1, 3, h, w) float32 in [-1, 1]) and the files they came from (for the record)."""

    calibration: list[np.ndarray]
    held_out: list[np.ndarray]
    calibration_files: list[str]
    held_out_files: list[str]
    how: str


def _lr_crop(path: Path, lr: tuple[int, int], scale: int, rng: np.random.Generator) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    from ..data.images import read_image

    img = read_image(path)  # H x W x 3 in [0, 1]; an unreadable file is one ImageReadError line naming it
    hh, hw = lr[0] * scale, lr[1] * scale
    img = _pad_hw(img, hh, hw)
    y = int(rng.integers(0, img.shape[0] - hh + 1))
    x = int(rng.integers(0, img.shape[1] - hw + 1))
    hr = torch.from_numpy(np.ascontiguousarray(img[y:y + hh, x:x + hw].transpose(2, 0, 1)))[None].float()
    low = F.interpolate(hr, size=lr, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (low * 2 - 1).numpy().astype(np.float32)


def _pad_hw(img: np.ndarray, hh: int, hw: int) -> np.ndarray:
    """Reflect-pad (folding, as the training crops do) to at least ``hh`` x ``hw``."""
    ph, pw = max(0, hh - img.shape[0]), max(0, hw - img.shape[1])
    if not (ph or pw):
        return img
    mode = "edge" if min(img.shape[:2]) == 1 else "reflect"
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode=mode)


def calibration_set(folders: Sequence[str | os.PathLike], lr_size: int | tuple[int, int], scale: int,
                    calibration: int, held_out: int, seed: int = 0) -> CalibrationSet:
    """``calibration`` LR crops and ``held_out`` more from files the calibration does not use.

    The files of all ``folders`` (recursive) are shuffled with ``seed``; the first
    ``min(held_out, n - 1)`` are held out, the rest cycled through for the calibration crops
    (a new random crop each pass). A missing, empty or unreadable folder or image is one
    :class:`AdcError` line naming it.
    """
    from ..data.images import list_images

    if not folders:
        raise AdcError("quantize: no calibration images (data.train_hr or --calibration DIR: a folder of HR images)")
    files: list[Path] = []
    for folder in folders:
        found = list_images(folder)
        if not found:
            raise AdcError(f"{folder}: holds no images (.png, .jpg, ..., searched recursively) to calibrate with")
        files += found
    if len(files) < 2:
        raise AdcError(f"{folders[0]}: {len(files)} image; calibration needs at least 2 (one is held out for the check)")
    lr = (lr_size, lr_size) if isinstance(lr_size, int) else (int(lr_size[0]), int(lr_size[1]))
    rng = np.random.default_rng(seed)
    order = [files[i] for i in rng.permutation(len(files))]
    n_check = min(held_out, len(files) - 1)
    check_files, cal_files = order[:n_check], order[n_check:]
    cal = [_lr_crop(cal_files[i % len(cal_files)], lr, scale, rng) for i in range(calibration)]
    check = [_lr_crop(f, lr, scale, rng) for f in check_files]
    how = (f"{lr[0] * scale}x{lr[1] * scale} HR crops of training images downscaled x{scale} (bicubic, antialiased) "
           f"to {lr[0]}x{lr[1]} LR; {len(cal)} crops from {len(cal_files)} files set the ranges, "
           f"{len(check)} files held out for the check (seed {seed})")
    return CalibrationSet(cal, check, [f.name for f in cal_files], [f.name for f in check_files], how)
