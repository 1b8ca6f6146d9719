"""Deploying an SR model: export (ONNX, ``torch.export``), exported-model runtimes, and safe fp16.

* :mod:`.export` -- ``export_model(model, path, format=...)``: an ``.onnx`` or ``.pt2`` file that
  records how it was made (:func:`read_export_record`), checked against eager PyTorch;
  ``python -m compress.export`` is its command line.
* :mod:`.runtime` -- ``load_exported(path)``: an exported file as a module with the zoo's SR
  contract, so :func:`compress.inference.upscale` (padding, tiling, colour fix) runs it unchanged.
* :mod:`.fp16` -- ``python -m compress.deploy.fp16``: per-block activation maxima on real images
  and the blocks that must stay fp32 under fp16 autocast (:mod:`compress.inference.fp16`).
"""

from .export import EXPORT_FORMATS, ExportResult, export_model, read_export_record
from .runtime import ExportedSR, load_exported

__all__ = ["EXPORT_FORMATS", "ExportResult", "ExportedSR", "export_model", "load_exported", "read_export_record"]
