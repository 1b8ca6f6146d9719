"""``QuantizeConfig``: what post-training int8 quantization does, and the gate its result must pass.

A module of its own without torch or onnxruntime, so a recipe with a ``quantize`` stage loads (and
its keys are checked) without importing either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import ranged
from ..errors import AdcError

__all__ = ["QuantizeConfig", "METHODS", "ACTIVATION_TYPES"]

METHODS = ("minmax", "percentile", "entropy")
ACTIVATION_TYPES = ("uint8", "int8")


@dataclass
class QuantizeConfig:
    """Static int8 (QDQ) quantization with onnxruntime, per-layer sensitivity, and the ship gate.

    Quality is int8 against the fp32 graph, on images in [0, 1] as written (outputs clamped):
    ``min_psnr_vs_fp32`` dB, and optionally ``max_output_error``, the max abs difference in the
    model's [-1, 1] output. Calibration images come from training HR folders (never the eval
    pairs); ``check_images`` of those files are held out of calibration for the final check.
    """

    method: Literal["minmax", "percentile", "entropy"] = "minmax"   # onnxruntime CalibrationMethod
    percentile: float = ranged(99.999, 90.0, 100.0)                  # method: percentile
    calibration_images: int = ranged(16, 1, 10000)                  # LR crops that set the activation ranges
    check_images: int = ranged(4, 1, 1000)                          # held-out LR crops for the final check
    per_channel: bool = True                                         # int8 weights per output channel
    activation_type: Literal["uint8", "int8"] = "uint8"             # uint8: faster here (reports/quantization.md)
    preprocess: bool = False                                         # onnxruntime's quant_pre_process first (no
                                                                     # gain measured: reports/quantization.md)
    keep_fp32: list[str] = field(default_factory=list)              # node-name globs never quantized
    attention_int8: bool = False                                     # attention's activation MatMuls too (slower here)
    # per-layer sensitivity, then the most sensitive groups kept fp32 until the bound holds
    sensitivity: bool = True
    sensitivity_images: int = ranged(2, 1, 64)                      # calibration crops each probe runs
    group_depth: int = ranged(4, 0, 64)                             # module-path parts per group (0: every node)
    max_groups: int = ranged(48, 1, 100000)                          # coarser groups above this many probes
    max_fp32_fraction: float = ranged(0.5, 0.0, 1.0)                # at most this share of the nodes kept fp32
    min_psnr_vs_fp32: float = ranged(35.0, 0.0, 200.0)              # dB, int8 vs fp32 images
    max_output_error: float | None = ranged(None, 0.0, 2.0)         # max abs in [-1, 1] (None: not checked)
    # the gate: int8 ships only if it is this much faster than fp32 here and meets the bound
    speed_gate: bool = True
    min_speedup: float = ranged(1.2, 0.0, 100.0)
    lr_size: int | None = ranged(None, 16, 8192)                     # export size (default: task.lr_size)
    dynamic: bool = False
    threads: int = ranged(0, 0, 1024)                                # onnxruntime threads (0: torch's count)
    warmup: int = ranged(2, 0, 1000)
    repeats: int = ranged(10, 1, 100000)                            # 2 x this many timed calls per model
    seed: int = ranged(0, 0, 2**31 - 1)

    def validate(self, path: str) -> None:
        if self.lr_size is not None and self.lr_size % 16:
            raise AdcError(f"{path}.lr_size: {self.lr_size} is not a multiple of 16")
        for i, pattern in enumerate(self.keep_fp32):
            if not isinstance(pattern, str) or not pattern:
                raise AdcError(f"{path}.keep_fp32[{i}]: expected a node-name glob such as '*/conv_in/*'")
