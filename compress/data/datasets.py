"""Datasets: seeded random HR crops for training, and LR/HR pairs for evaluation.

Why seeded per item: every random choice of item ``i`` in epoch ``e`` comes from a generator seeded
with (seed, epoch, i), so a run gives the same crops whatever the number of DataLoader workers,
and a resumed run (``set_epoch``) reproduces the crops it would have seen.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AdcError
from ..log import get_logger
from .images import SkippedImages, list_images, read_image, to_chw_tensor, try_read_image

logger = get_logger(__name__)


def _item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Independent stream for one item (SeedSequence mixes the three numbers well)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index)]))


def pad_to_min_size(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad (edge pixel not repeated, OpenCV's REFLECT_101) at the bottom and right.

    This is AdcSR's rule for images smaller than the crop: pad up to the crop size, then crop.
    numpy's "reflect" folds repeatedly, so even images under half the crop size are filled.
    """
    h, w = img.shape[:2]
    pad_h, pad_w = max(0, size - h), max(0, size - w)
    if pad_h == 0 and pad_w == 0:
        return img
    if h == 1 or w == 1:  # reflection needs two pixels along the axis
        return np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")


class HRCropDataset(Dataset):
    """Random ``crop`` x ``crop`` HR patches (3 x crop x crop float32 in [0, 1]).

    Per item, in AdcSR's order: horizontal flip (p=0.5, if ``hflip``), vertical flip and transpose
    (p=0.5 each, if ``rot``), reflect-pad to the crop size if smaller, then a uniform random crop.

    ``length=None``: one item per file (item i reads file i; shuffle with the DataLoader).
    ``length=N``: N items, each reading a file drawn at random, as AdcSR's loader does
    (its epoch is ``batch_size * iter_num`` random picks).

    An unreadable file is logged once, counted in ``skipped_count`` and replaced by the next
    readable file in sorted order.
    """

    def __init__(self, root: str | os.PathLike, crop: int = 512, hflip: bool = True, rot: bool = False,
                 seed: int = 0, length: int | None = None, recursive: bool = True):
        if int(crop) <= 0:
            raise AdcError(f"HRCropDataset crop: expected a positive size, got {crop}")
        if length is not None and int(length) <= 0:
            raise AdcError(f"HRCropDataset length: expected a positive number of items or None, got {length}")
        self.root = Path(root)
        self.paths = list_images(self.root, recursive=recursive)
        if not self.paths:
            raise AdcError(f"{self.root}: no images found (extensions: png, jpg, jpeg, webp, bmp, tif, tiff)")
        self.crop = int(crop)
        self.hflip = bool(hflip)
        self.rot = bool(rot)
        self.seed = int(seed)
        self.length = None if length is None else int(length)
        self.epoch = 0
        self.skipped = SkippedImages()
        self._check_crop()

    def _check_crop(self, sample: int = 64) -> None:
        """A crop larger than every image would train on reflection padding alone: refuse it.

        Images smaller than the crop are padded by reflection, as AdcSR's loader does; that is
        logged. Up to ``sample`` evenly spaced files are measured (headers only).
        """
        from PIL import Image

        picks = self.paths[:: max(1, len(self.paths) // sample)][:sample]
        sides = []
        for p in picks:
            try:
                with Image.open(p) as im:
                    sides.append((min(im.size), p))
            except Exception:  # noqa: BLE001 - an unreadable file is reported when it is read
                continue
        if not sides:
            return
        largest = max(sides)[0]
        if largest < self.crop:
            raise AdcError(f"{self.root}: crop {self.crop} is larger than every image measured (the largest short "
                           f"side is {largest} px, {max(sides)[1].name}); a crop must fit the training images, "
                           "choose crop <= that side")
        small = sum(1 for side, _ in sides if side < self.crop)
        if small:
            logger.warning(f"{self.root}: {small} of {len(sides)} images measured are smaller than the crop "
                           f"{self.crop}: they are padded by reflection (as AdcSR's loader does)")

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch``; call before each epoch (and after resuming)."""
        self.epoch = int(epoch)

    @property
    def skipped_count(self) -> int:
        return self.skipped.count

    def __len__(self) -> int:
        return len(self.paths) if self.length is None else self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = _item_rng(self.seed, self.epoch, index)
        # A fixed number of draws in a fixed order: toggling hflip/rot never shifts the crops.
        pick = int(rng.integers(len(self.paths)))
        do_hflip, do_vflip, do_transpose = rng.random(3) < 0.5
        top_u, left_u = rng.random(2)
        file_index = index if self.length is None else pick
        img = self._read_first_readable(file_index)
        if self.hflip and do_hflip:
            img = img[:, ::-1]
        if self.rot and do_vflip:
            img = img[::-1]
        if self.rot and do_transpose:
            img = img.transpose(1, 0, 2)
        img = pad_to_min_size(img, self.crop)
        h, w = img.shape[:2]
        top = min(int(top_u * (h - self.crop + 1)), h - self.crop)
        left = min(int(left_u * (w - self.crop + 1)), w - self.crop)
        return to_chw_tensor(img[top:top + self.crop, left:left + self.crop])

    def _read_first_readable(self, file_index: int) -> np.ndarray:
        n = len(self.paths)
        for step in range(n):
            img = try_read_image(self.paths[(file_index + step) % n], self.skipped)
            if img is not None:
                return img
        raise AdcError(f"{self.root}: none of the {n} image files is readable")


class PairedFolderDataset(Dataset):
    """LR/HR pairs matched by sorted file order (the RealSR / DRealSR benchmark layout).

    Items are ``dict(lr=3xhxw, hr=3xHxW, name=<LR file stem>)``. An unreadable file raises an
    :class:`AdcError` rather than being skipped: dropping one side of a pair would silently change
    a benchmark's mean. With ``scale`` set, each HR must be exactly ``scale`` times its LR.
    """

    def __init__(self, lr_dir: str | os.PathLike, hr_dir: str | os.PathLike, *, scale: int | None = None,
                 recursive: bool = False):
        self.lr_dir, self.hr_dir = Path(lr_dir), Path(hr_dir)
        self.lr_paths = self._scan(self.lr_dir, "lr_dir", recursive)
        self.hr_paths = self._scan(self.hr_dir, "hr_dir", recursive)
        if len(self.lr_paths) != len(self.hr_paths):
            raise AdcError(
                f"{self.lr_dir} has {len(self.lr_paths)} images but {self.hr_dir} has {len(self.hr_paths)}: "
                f"pairs are matched by sorted file order, so the counts must be equal")
        self.scale = None if scale is None else int(scale)

    @staticmethod
    def _scan(folder: Path, what: str, recursive: bool) -> list[Path]:
        if not folder.is_dir():
            raise AdcError(f"{what} {folder}: folder not found")
        paths = list_images(folder, recursive=recursive)
        if not paths:
            raise AdcError(f"{what} {folder}: no images found (extensions: png, jpg, jpeg, webp, bmp, tif, tiff)")
        return paths

    def __len__(self) -> int:
        return len(self.lr_paths)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        lr_path, hr_path = self.lr_paths[index], self.hr_paths[index]
        lr, hr = read_image(lr_path), read_image(hr_path)
        if self.scale is not None and (hr.shape[0] != lr.shape[0] * self.scale
                                       or hr.shape[1] != lr.shape[1] * self.scale):
            raise AdcError(f"{hr_path}: HR is {hr.shape[1]}x{hr.shape[0]} but LR {lr_path.name} is "
                           f"{lr.shape[1]}x{lr.shape[0]}; expected exactly x{self.scale}")
        name = lr_path.relative_to(self.lr_dir).with_suffix("").as_posix()
        return {"lr": to_chw_tensor(lr), "hr": to_chw_tensor(hr), "name": name}


__all__ = ["HRCropDataset", "PairedFolderDataset", "pad_to_min_size"]
