"""Deploying an SR model: export (ONNX, ``torch.export``), exported-model runtimes, and safe fp16.

* :mod:`.export` -- ``export_model(model, path, format=...)``: an ``.onnx`` or ``.pt2`` file that
  records how it was made (:func:`read_export_record`), checked against eager PyTorch;
  ``python -m compress.export`` is its command line.
* :mod:`.runtime` -- ``load_exported(path)``: an exported file as a module with the zoo's SR
  contract, so :func:`compress.inference.upscale` (padding, tiling, colour fix) runs it unchanged.
* :mod:`.fp16` -- ``python -m compress.deploy.fp16``: per-block activation maxima on real images
  and the blocks that must stay fp32 under fp16 autocast (:mod:`compress.inference.fp16`).

Names load on first use (PEP 562), so reading a record (:mod:`.record`) does not import torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_WHERE = {"EXPORT_FORMATS": "record", "read_export_record": "record", "ExportResult": "export",
          "export_model": "export", "ExportedSR": "runtime", "load_exported": "runtime"}

__all__ = ["EXPORT_FORMATS", "ExportResult", "ExportedSR", "export_model", "load_exported", "read_export_record"]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
