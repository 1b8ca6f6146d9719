"""Export an SR model to ONNX or a ``torch.export`` program, checked against eager PyTorch.

Why: users of AdcSR and OSEDiff ask for ONNX / TensorRT / Core ML; a deployable file has to say
how it was made (which model, which torch, which LR size, whether the colour fix is in the graph)
and has to be shown to compute what the eager model computes. Every exported file carries a JSON
record (ONNX: ``metadata_props["adc"]``; ``.pt2``: the extra file ``adc.json``) with the source,
versions, shapes, colour-fix placement, opset and the measured parity (max abs difference to
eager fp32 on a seeded random LR, at the export size and, for dynamic graphs, at a second size).

The graph maps LR in [-1, 1] (1, 3, h, w) float32 to SR in [-1, 1] (1, 3, s*h, s*w), the zoo's
model contract, not clamped. ``color_fix="inside"`` puts AdcSR's per-channel colour match in the
graph (the file alone reproduces the official ``test.py``); ``"outside"`` leaves it out, so a
tiler can apply it once over the whole stitched image (what :mod:`compress.inference` does, and
what :func:`compress.deploy.runtime.load_exported` does when a graph lacks it). The record says
which (``color_fix``, and ``color_fix_runs`` in words); ``compress.sr`` runs either kind.

Exporter: the TorchScript one by default. Measured on the tiny student (2 shared CPU cores,
torch 2.13, onnxruntime 1.32; ``python -m compress.export adcsr --size tiny --dynamic
--exporter X``): 22 s vs 57 s for dynamo at 128x128, 2-3 s vs 12-45 s at 16/32, with the same
parity (max abs to eager 3-4e-5 dynamic, 2-7e-4 for both on a static 16x16 with the fix inside).
``--exporter dynamo`` stays available (TorchScript's exporter is deprecated upstream).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import __version__
from ..errors import AdcError, short_repr
from ..inference.engine import color_fix_off
from ..inference.padding import model_pad_multiple
from ..zoo.adcsr import match_color
from .record import (COLOR_FIX_RUNS, DEFAULT_EXPORTER, DEFAULT_OPSET, DEFAULT_TOLERANCE, EXPORT_FORMATS, EXPORTERS,
                     OPSETS, PROGRAM_MIN_BLOCKS, RECORD_FILE, RECORD_FORMAT, RECORD_KEY, check_export_target, default_path,
                     read_export_record)

__all__ = ["EXPORT_FORMATS", "EXPORTERS", "DEFAULT_EXPORTER", "RECORD_KEY", "RECORD_FILE", "ExportResult", "SRGraph",
           "export_model", "read_export_record", "parity_inputs", "default_path"]

PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # one .onnx file holds < 2 GiB; above, weights go to NAME.data

Log = Callable[[str], None]


class SRGraph(nn.Module):
    """What is exported: ``model`` with its own colour fix off, AdcSR's match applied here when ``color_fix``."""

    def __init__(self, model: nn.Module, color_fix: bool):
        super().__init__()
        self.model = model
        self.color_fix = color_fix

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        sr = self.model(lr)
        return match_color(sr, lr) if self.color_fix else sr


@dataclass
class ExportResult:
    """The written file (and its weights file, for ONNX above 2 GiB), its record, and the parity found."""

    path: Path
    record: dict[str, Any]
    files: list[Path] = field(default_factory=list)

    @property
    def max_abs(self) -> float | None:
        parity = self.record.get("parity") or {}
        return parity.get("max_abs")

    @property
    def parity_ok(self) -> bool | None:
        parity = self.record.get("parity") or {}
        return parity.get("ok")


def _lr_size(lr_size: int | tuple[int, int], multiple: int) -> tuple[int, int]:
    h, w = (lr_size, lr_size) if isinstance(lr_size, int) else tuple(lr_size)
    if h < multiple or w < multiple or h % multiple or w % multiple:
        raise AdcError(f"--lr-size {h}x{w}: expected sides that are positive multiples of {multiple} "
                       "(the model's padding multiple)")
    return int(h), int(w)


def _color_fix_mode(model: nn.Module, color_fix: str | None) -> str:
    has = isinstance(getattr(model, "color_fix", None), bool)
    if color_fix is None:
        return "inside" if has and model.color_fix else "none"
    if color_fix not in ("inside", "outside", "none"):
        raise AdcError(f"--color-fix {color_fix!r}: expected inside, outside or none")
    if color_fix != "none" and not has:
        raise AdcError(f"--color-fix {color_fix}: {type(model).__name__} has no colour fix (use --color-fix none)")
    return color_fix


def parity_inputs(lr_size: tuple[int, int], dynamic: bool, multiple: int, seed: int = 0,
                  min_side: int | None = None) -> list[torch.Tensor]:
    """Seeded random LRs in [-1, 1]: the export size, and for a dynamic graph also half its height
    (not below ``min_side``, default one ``multiple``)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [lr_size]
    if dynamic:
        half = max(min_side or multiple, lr_size[0] // 2 // multiple * multiple)
        sizes.append((half if half != lr_size[0] else lr_size[0] + multiple, lr_size[1]))
    return [torch.rand(1, 3, h, w, generator=g) * 2 - 1 for h, w in sizes]


def _scale(graph: nn.Module, example: torch.Tensor, multiple: int) -> tuple[int, torch.Tensor]:
    """(the model's scale, its output on ``example``), from one eager call."""
    with torch.no_grad():
        out = graph(example)
    if out.dim() != 4 or out.shape[-1] % example.shape[-1] or out.shape[-2] % example.shape[-2]:
        raise AdcError(f"the model maps {tuple(example.shape)} to {tuple(out.shape)}: not an integer-scale SR model")
    return out.shape[-1] // example.shape[-1], out


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())


# ----------------------------------------------------------------------------- ONNX


def _require_onnx(check: bool) -> None:
    missing = []
    for mod in ("onnx", "onnxscript") + (("onnxruntime",) if check else ()):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise AdcError(f"ONNX export needs {', '.join(missing)}: pip install -e '.[deploy]' "
                       f"(or pip install {' '.join(missing)})")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters' chatter (deprecation notes, "torchvision is not installed" per torchvision op) off."""
    import warnings

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


def _export_onnx(graph: SRGraph, example: torch.Tensor, path: Path, dynamic: bool, multiple: int, opset: int,
                 exporter: str) -> None:
    if exporter == "dynamo":
        dyn = None
        if dynamic:
            h, w = torch.export.Dim("lr_h_blocks", min=1), torch.export.Dim("lr_w_blocks", min=1)
            dyn = {"lr": {2: multiple * h, 3: multiple * w}}
        with _quiet_exporter():
            prog = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset, dynamic_shapes=dyn,
                                     input_names=["lr"], output_names=["sr"], verbose=False)
        prog.save(str(path), external_data=_param_bytes(graph) > PROTOBUF_LIMIT)
    else:
        axes = {"lr": {2: "lr_height", 3: "lr_width"}, "sr": {2: "sr_height", 3: "sr_width"}} if dynamic else None
        with _quiet_exporter():
            torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset, input_names=["lr"],
                              output_names=["sr"], dynamic_axes=axes, do_constant_folding=True)


def _set_onnx_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` into the model's metadata_props (weights in an external file are left where they are)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    keep = [p for p in proto.metadata_props if p.key != RECORD_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    proto.metadata_props.add(key=RECORD_KEY, value=json.dumps(record, sort_keys=True))
    onnx.save_model(proto, str(path))


def _onnx_opset(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _run_onnx(path: Path, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = [torch.from_numpy(sess.run(None, {name: x.numpy()})[0]) for x in inputs]
    return outs, f"onnxruntime {ort.__version__} CPUExecutionProvider"


# ----------------------------------------------------------------------------- torch.export


def _export_program(graph: SRGraph, example: torch.Tensor, dynamic: bool, multiple: int):
    dyn = None
    if dynamic:
        # at least two blocks a side: torch.export specialises a side of one block away (a guard fails
        # at run time); the runtime pads smaller LRs up to ``min_lr_side`` and crops the output back
        h, w = (torch.export.Dim(f"lr_{side}_blocks", min=PROGRAM_MIN_BLOCKS) for side in "hw")
        dyn = {"lr": {2: multiple * h, 3: multiple * w}}
    return torch.export.export(graph, (example,), dynamic_shapes=dyn, strict=False)


# ----------------------------------------------------------------------------- entry point


def export_model(model: nn.Module, path: str | os.PathLike, format: str = "onnx",
                 lr_size: int | tuple[int, int] = 128, dynamic: bool = False, color_fix: str | None = None, *,
                 opset: int = DEFAULT_OPSET, exporter: str = DEFAULT_EXPORTER, source: str | None = None,
                 check: bool = True, tolerance: float = DEFAULT_TOLERANCE, log: Log | None = None) -> ExportResult:
    """Export ``model`` (the zoo's SR contract, on CPU, fp32) to ``path``; returns the file and its record.

    ``format``: "onnx" or "torch-export" (``.pt2``). ``lr_size``: the example LR side (or (h, w));
    with ``dynamic`` any multiple of the model's padding multiple runs (batch stays 1).
    ``color_fix``: "inside" | "outside" | "none" (default: inside when the model has AdcSR's fix on).
    ``check``: run the exported file against eager fp32 and record the max abs difference; the
    result's ``parity_ok`` says whether it is <= ``tolerance`` (the file is written either way).
    ``source``: how the model was obtained (a path, a zoo name), for the record. ``exporter``
    (ONNX): "torchscript" (default, the faster) or "dynamo". The record names the onnxruntime
    version that measured the parity (``onnxruntime_version``).
    """
    log = log or (lambda s: None)
    if format not in EXPORT_FORMATS:
        raise AdcError(f"--format {format!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if exporter not in EXPORTERS:
        raise AdcError(f"--exporter {exporter!r}: expected one of {', '.join(EXPORTERS)}")
    low, high = OPSETS[exporter]
    if format == "onnx" and not (isinstance(opset, int) and low <= opset <= high):
        raise AdcError(f"--opset {short_repr(opset)}: the {exporter} exporter writes opsets {low} to {high} "
                       f"for this model (default {DEFAULT_OPSET})")
    path = Path(path)
    if path.suffix != EXPORT_FORMATS[format]:
        raise AdcError(f"{path}: a {format} file must end in {EXPORT_FORMATS[format]}")
    check_export_target(path)  # an existing file is replaced only if it is an export of adc's
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        raise AdcError("export_model: the model must be fp32 on the CPU (export once, run anywhere)")
    multiple = model_pad_multiple(model)
    size = _lr_size(lr_size, multiple)
    fix = _color_fix_mode(model, color_fix)
    if format == "onnx":
        _require_onnx(False)

    model.eval()
    min_side = multiple * (PROGRAM_MIN_BLOCKS if format == "torch-export" and dynamic else 1)
    if size[0] < min_side or size[1] < min_side:
        raise AdcError(f"--lr-size {size[0]}x{size[1]}: a dynamic .pt2 is exported from an LR of at least "
                       f"{min_side}x{min_side}")
    inputs = parity_inputs(size, dynamic, multiple, min_side=min_side)
    t0 = time.perf_counter()
    with color_fix_off(model), torch.no_grad():
        graph = SRGraph(model, fix == "inside").eval()
        scale, _ = _scale(graph, inputs[0][..., :multiple, :multiple], multiple)
        expected = [graph(x) for x in inputs] if check else []
        record: dict[str, Any] = {
            "format": RECORD_FORMAT, "version": 1, "adc_version": __version__, "torch_version": torch.__version__,
            "source": source or type(model).__name__, "model_class": type(model).__name__,
            "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "export_format": format, "lr_size": list(size), "dynamic": dynamic,
            "dynamic_sides": f"any multiple of {multiple}" if dynamic else None, "batch": 1,
            "pad_multiple": multiple, "min_lr_side": min_side, "scale": scale, "color_fix": fix,
            "color_fix_runs": COLOR_FIX_RUNS[fix],
            "input": {"name": "lr", "shape": ["1", "3", "h", "w"], "dtype": "float32", "range": "[-1, 1]"},
            "output": {"name": "sr", "shape": ["1", "3", f"{scale}h", f"{scale}w"], "dtype": "float32",
                       "range": "[-1, 1] (not clamped)"},
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tmp = tmp_dir / path.name
            if format == "onnx":
                log(f"exporting to ONNX ({exporter} exporter, opset {opset}, "
                    f"{'dynamic' if dynamic else 'static'} {size[0]}x{size[1]})")
                _export_onnx(graph, inputs[0], tmp, dynamic, multiple, opset, exporter)
                import onnx

                record.update(exporter=f"torch.onnx.export(dynamo={exporter == 'dynamo'})", opset=_onnx_opset(tmp),
                              onnx_version=onnx.__version__)
            else:
                log(f"exporting with torch.export ({'dynamic' if dynamic else 'static'} {size[0]}x{size[1]})")
                program = _export_program(graph, inputs[0], dynamic, multiple)
                record.update(exporter="torch.export.export(strict=False)", opset=None)
            record["export_seconds"] = round(time.perf_counter() - t0, 1)
            record["parity"] = None
            if check:
                if format == "onnx":
                    try:
                        got, runtime = _run_onnx(tmp, inputs)
                    except ImportError:
                        got, runtime = [], ""
                        log("notice: onnxruntime is not installed; parity not checked (pip install onnxruntime)")
                else:
                    got, runtime = [program.module()(x) for x in inputs], f"torch {torch.__version__} (ExportedProgram.module())"
                if got:
                    if format == "onnx":  # which runtime measured it: parity moves with onnxruntime versions
                        import onnxruntime

                        record["onnxruntime_version"] = onnxruntime.__version__
                    diffs = [(g - e).abs().max().item() for g, e in zip(got, expected)]
                    record["parity"] = {"max_abs": max(diffs), "per_size": diffs, "tolerance": tolerance,
                                        "ok": max(diffs) <= tolerance,
                                        "sizes": [list(x.shape[-2:]) for x in inputs], "runtime": runtime,
                                        "against": "eager PyTorch fp32, seeded random LR in [-1, 1]"}
            if format == "onnx":
                _set_onnx_record(tmp, record)
            else:
                torch.export.save(program, str(tmp), extra_files={RECORD_FILE: json.dumps(record, sort_keys=True)})
            files = sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name)  # the weights file before the model
            written = []
            for f in files:
                os.replace(f, path.parent / f.name)
                written.append(path.parent / f.name)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExportResult(path, record, written)
