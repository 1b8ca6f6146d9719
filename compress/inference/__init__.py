"""Inference around SR models: reflection padding, tiling, precision (fp16 with fp32 blocks), global colour fix.

``upscale(model, lr01, tile=..., overlap=..., dtype=...)`` is the entry point; the CLI is
``python -m compress.sr``.
"""

from .color import match_color_
from .engine import color_fix_off, model_device, upscale
from .fp16 import Fp16Policy, calibrate, keep_fp32, load_policy
from .padding import model_pad_multiple, reflect_pad_to_multiple
from .precision import Precision, parse_dtype, resolve_precision
from .tiling import Stitcher, TileGrid, axis_starts, axis_window

__all__ = [
    "upscale", "color_fix_off", "model_device", "match_color_", "model_pad_multiple", "reflect_pad_to_multiple",
    "Precision", "parse_dtype", "resolve_precision", "Stitcher", "TileGrid", "axis_starts", "axis_window",
    "Fp16Policy", "calibrate", "keep_fp32", "load_policy",
]
