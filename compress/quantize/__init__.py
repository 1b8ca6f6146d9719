"""Post-training int8 quantization of exported SR graphs (onnxruntime, CPU), gated on measured speed and quality.

* :mod:`.config` -- :class:`QuantizeConfig` (the ``quantize`` stage's keys).
* :mod:`.calibration` -- :func:`calibration_set`: LR crops from training HR images, calibration and held out.
* :mod:`.onnx_int8` -- :func:`quantize_onnx`: QDQ int8 with onnxruntime, per-layer sensitivity, fp32 fallbacks.
* :mod:`.ship` -- :func:`ship`: fp32 vs int8 latency and quality here, and the one file that ships.

``python -m compress.export MODEL --quantize int8 --calibration DIR`` and the recipe stage
``quantize`` (:mod:`compress.stages.quantize`) run all four. Names load on first use (PEP 562).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_WHERE = {"QuantizeConfig": "config", "CalibrationSet": "calibration", "calibration_set": "calibration",
          "QuantizeResult": "onnx_int8", "quantize_onnx": "onnx_int8", "ShipResult": "ship", "ship": "ship"}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
