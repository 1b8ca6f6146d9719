"""Inference around SR models: reflection padding, tiling, precision (fp16 with fp32 blocks), global colour fix.

``upscale(model, lr01, tile=..., overlap=..., dtype=...)`` is the entry point (a tensor);
``upscale_to_png(model, lr01, path, ...)`` writes the same pixels with memory bounded by the
tile. The CLI is ``python -m compress.sr``.
"""

from .color import ChannelStats, ColorMap, match_color_
from .engine import color_fix_off, model_device, to_uint8_rows, upscale, upscale_to_png
from .fp16 import Fp16Policy, calibrate, keep_fp32, load_policy
from .padding import model_pad_multiple, reflect_index, reflect_pad_to_multiple
from .png import PngWriter
from .precision import Precision, parse_dtype, resolve_precision
from .tiling import BandStitcher, Stitcher, TileGrid, axis_starts, axis_window

__all__ = [
    "upscale", "upscale_to_png", "to_uint8_rows", "color_fix_off", "model_device", "match_color_", "ChannelStats",
    "ColorMap", "model_pad_multiple", "reflect_index", "reflect_pad_to_multiple", "PngWriter", "Precision", "parse_dtype",
    "resolve_precision", "BandStitcher", "Stitcher", "TileGrid", "axis_starts", "axis_window",
    "Fp16Policy", "calibrate", "keep_fp32", "load_policy",
]
