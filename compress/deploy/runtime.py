"""Run an exported ``.onnx`` (onnxruntime) or ``.pt2`` (``torch.export``) file as an SR module.

Why a module: :func:`compress.inference.upscale` pads, tiles, stitches and colour-fixes any
module with the zoo's contract (``forward(lr)`` in [-1, 1] -> x``scale`` SR, ``config.pad_multiple``,
a boolean ``color_fix`` it switches off while tiles run and applies once on the whole image).
:class:`ExportedSR` gives an exported file that contract from its record, so ``compress.sr
--backend onnxruntime`` runs the same padding, tiling and colour fix as the torch backend.

The record's ``color_fix`` says where AdcSR's colour match happens. ``outside``: here, so
``upscale`` switches it off per tile and applies it once over the whole image (exactly as the
torch backend). ``inside``: in the graph, on every call; it is not applied a second time, so an
untiled image gets the official whole-image fix (over the reflection padding too, when a side is
not a multiple of 16) and a tiled one gets it per tile (``compress.sr`` says so when tiling).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdcError
from ..inference.padding import reflect_pad_to_min
from ..io import refused_pickle, weights_only_loads
from ..zoo.adcsr import match_color
from .record import read_export_record

__all__ = ["ExportedSR", "OnnxSR", "ProgramSR", "load_exported", "onnx_providers"]


@dataclass(frozen=True)
class _Config:
    pad_multiple: int


class ExportedSR(nn.Module):
    """An exported SR graph with the zoo's contract; subclasses implement :meth:`run`."""

    def __init__(self, path: Path, record: dict[str, Any]):
        super().__init__()
        self.path, self.record = path, record
        self.config = _Config(int(record.get("pad_multiple", 16)))
        self.scale = int(record.get("scale", 4))
        self.graph_color_fix = record.get("color_fix", "none")
        self.dynamic = bool(record.get("dynamic"))
        self.lr_size = tuple(record.get("lr_size", ()))
        # a dynamic .pt2 runs sides of at least two blocks (record ``min_lr_side``); smaller LRs are padded
        self.min_lr_side = int(record.get("min_lr_side") or self.config.pad_multiple) if self.dynamic else 0
        self._fix = self.graph_color_fix != "none"

    @property
    def fix_in_graph(self) -> bool:
        """The graph colour-matches every call itself (record ``color_fix: inside``)."""
        return self.graph_color_fix == "inside"

    @property
    def color_fix(self) -> bool:
        """Whether this module applies the colour fix outside the graph (an "outside" graph with it on).

        Always False for an "inside" graph: the graph does it, and nothing is left for a runner
        to switch off per tile or to apply again over the whole image.
        """
        return self._fix and self.graph_color_fix == "outside"

    @color_fix.setter
    def color_fix(self, value: bool) -> None:
        if value and self.graph_color_fix == "none":
            raise AdcError(f"{self.path}: this graph was exported without a colour fix")
        self._fix = bool(value) or self.fix_in_graph  # an inside fix cannot be switched off

    def _check_shape(self, lr: torch.Tensor) -> None:
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise AdcError(f"{self.path}: expected LR (B, 3, h, w), got {tuple(lr.shape)}")
        h, w = lr.shape[-2:]
        m = self.config.pad_multiple
        if not self.dynamic and (h, w) != self.lr_size:
            raise AdcError(f"{self.path}: the graph was exported for LR {self.lr_size[0]}x{self.lr_size[1]} only, "
                           f"this input is {h}x{w}; export with --dynamic, or tile with --tile "
                           f"{self.lr_size[0]} on images at least that large")
        if h % m or w % m:
            raise AdcError(f"{self.path}: LR {h}x{w} is not a multiple of {m} (upscale pads it for you)")

    def run(self, lr: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        self._check_shape(lr)
        dev = lr.device
        x, (h, w) = reflect_pad_to_min(lr.detach().float().cpu(), self.min_lr_side)
        # batch 1 graphs: one call per image
        sr = torch.cat([self.run(x[i:i + 1].contiguous()) for i in range(x.shape[0])])
        sr = sr[..., :self.scale * h, :self.scale * w].to(dev)
        if self.color_fix:
            sr = match_color(sr, lr.float())
        return sr


def onnx_providers(device: str | torch.device | None) -> list[str]:
    """onnxruntime providers for ``device``: CUDA first when asked for and available, then CPU."""
    import onnxruntime as ort

    dev = torch.device(device) if device is not None else torch.device("cpu")
    have = ort.get_available_providers()
    if dev.type == "cuda":
        if "CUDAExecutionProvider" not in have:
            raise AdcError(f"--device {device}: this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
                           f"(has {', '.join(have)}); install onnxruntime-gpu or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if dev.type != "cpu":
        raise AdcError(f"--device {device}: the onnxruntime backend runs on cpu or cuda")
    return ["CPUExecutionProvider"]


class OnnxSR(ExportedSR):
    """An ``.onnx`` graph in an onnxruntime session (all graph optimisations on)."""

    def __init__(self, path: Path, record: dict[str, Any], device: str | torch.device | None = "cpu",
                 threads: int | None = None):
        super().__init__(path, record)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=onnx_providers(device))
        except Exception as exc:  # onnxruntime's own exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise AdcError(f"{path}: onnxruntime could not load it ({first})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()

    def run(self, lr: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: lr.numpy()})[0])


class ProgramSR(ExportedSR):
    """A ``.pt2`` ``torch.export`` program, run as its ``module()`` on the CPU."""

    def __init__(self, path: Path, record: dict[str, Any]):
        super().__init__(path, record)
        try:
            with weights_only_loads():  # a .pt2 never runs code on load, on any of torch's paths
                program = torch.export.load(str(path))
        except pickle.UnpicklingError as exc:
            raise refused_pickle(path, exc, "a pickle in the archive") from None
        except Exception as exc:  # torch raises several types for a bad archive
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise AdcError(f"{path}: torch.export.load failed ({first})") from None
        self.program = program.module()

    def run(self, lr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.program(lr)


def load_exported(path: str | os.PathLike, device: str | torch.device | None = "cpu",
                  threads: int | None = None) -> ExportedSR:
    """An exported ``.onnx`` (onnxruntime, CPU or CUDA provider) or ``.pt2`` (torch, CPU) file as an SR module."""
    path = Path(path)
    record = read_export_record(path)
    if path.suffix == ".onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise AdcError(f"{path}: running an ONNX file needs onnxruntime (pip install -e '.[deploy]')") from None
        return OnnxSR(path, record, device, threads)
    if device is not None and torch.device(device).type != "cpu":
        raise AdcError(f"{path}: a .pt2 program runs on the CPU here; use --device cpu")
    return ProgramSR(path, record)
