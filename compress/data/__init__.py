"""Data layer: image reading, HR crop / paired datasets, and the Real-ESRGAN degradation."""

from .datasets import HRCropDataset, PairedFolderDataset
from .degradation import DegradationConfig, PairPool, RealESRGANDegradation
from .images import IMAGE_EXTENSIONS, ImageReadError, SkippedImages, list_images, read_image
from .jpeg import jpeg_pil, jpeg_torch

__all__ = [
    "HRCropDataset", "PairedFolderDataset", "DegradationConfig", "PairPool", "RealESRGANDegradation",
    "IMAGE_EXTENSIONS", "ImageReadError", "SkippedImages", "list_images", "read_image", "jpeg_pil", "jpeg_torch",
]
