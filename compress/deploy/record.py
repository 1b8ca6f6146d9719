"""The export record and the export defaults, without torch.

Why a module of its own: ``adc export --help`` and ``--show FILE`` need the defaults and the
record reader, and neither should wait seconds for torch to import. :mod:`.export` writes the
record; this module reads it (ONNX: ``metadata_props["adc"]``; ``.pt2``: the extra file ``adc.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import AdcError

__all__ = ["EXPORT_FORMATS", "EXPORTERS", "DEFAULT_EXPORTER", "DEFAULT_OPSET", "DEFAULT_TOLERANCE", "RECORD_KEY",
           "RECORD_FILE", "RECORD_FORMAT", "COLOR_FIX_RUNS", "OPSETS", "PROGRAM_MIN_BLOCKS", "check_export_target",
           "default_path", "read_export_record"]

EXPORT_FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
EXPORTERS = ("torchscript", "dynamo")  # ONNX only: the TorchScript exporter or torch.onnx.export(dynamo=True)
# The TorchScript exporter: 2-3x faster to export the tiny student than dynamo, at the same parity
# (both well under DEFAULT_TOLERANCE; measurements in compress/deploy/export.py's docstring).
DEFAULT_EXPORTER = "torchscript"
RECORD_KEY = "adc"  # ONNX metadata_props key holding the JSON record
RECORD_FILE = "adc.json"  # extra file inside a .pt2
RECORD_FORMAT = "adc-export"
DEFAULT_OPSET = 18
# ONNX opsets each exporter writes for these models (torch 2.13): the TorchScript exporter stops at 20
# (torch.onnx's ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET) and needs 14 for scaled_dot_product_attention;
# dynamo writes 18 to 23 (below 18 it wrote opset 18 anyway, without a word).
OPSETS = {"torchscript": (14, 20), "dynamo": (18, 23)}
# A dynamic .pt2 runs LR sides of at least this many pad multiples: torch.export specialises a side of
# one block away, so a 16-pixel LR would fail a guard inside the program (ONNX has no such limit).
PROGRAM_MIN_BLOCKS = 2
# Max abs difference to eager fp32 in the [-1, 1] output: an eighth of one 8-bit level (2/255), so the
# written PNG can differ only where a value sits on a rounding boundary. 1e-4 was tighter than fp32 holds:
# at LR 16 px with the colour fix inside, eager fp32 itself is 1.7e-4 from fp64 (tests/test_deploy_export.py).
DEFAULT_TOLERANCE = 1e-3
# What a runner does with each colour-fix placement; written into the record, followed by compress.sr.
COLOR_FIX_RUNS = {
    "inside": "in the graph, on every call: the runner applies no second fix (a tiled image is fixed per tile)",
    "outside": "left to the runner: compress.sr applies it once over the whole image, tiled or not",
    "none": "no colour fix",
}


def default_path(stem: str, fmt: str, lr_size: tuple[int, int], dynamic: bool, color_fix: str) -> Path:
    """``exports/<stem>-<128x128|dyn>-<fix>.<ext>``: the CLI's default output name."""
    size = "dyn" if dynamic else f"{lr_size[0]}x{lr_size[1]}"
    fix = {"inside": "fix", "outside": "nofix", "none": "raw"}[color_fix]
    return Path("exports") / f"{stem}-{size}-{fix}{EXPORT_FORMATS[fmt]}"


def check_export_target(path: str | os.PathLike) -> None:
    """Refuse (one line naming it) to replace an existing file at ``path``, or its ``NAME.data``
    weights, unless that is an export of adc's: the file carries its record, the proof it was written
    by compress.export (:func:`compress.ownership.check_replace`)."""
    from ..ownership import check_replace

    path = Path(path)
    hint = "move it away or choose another --out"

    def exported(p: Path) -> bool:
        try:
            read_export_record(p)
        except AdcError:
            return False
        return True

    check_replace(path, proof=exported, hint=hint)
    if not os.path.lexists(path):  # weights beside no export of adc's: not its own
        check_replace(path.with_name(path.name + ".data"), hint=hint)


def read_export_record(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of an exported ``.onnx`` or ``.pt2`` file; one-line errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise AdcError(f"{path}: file not found")
    if path.suffix == ".onnx":
        try:
            import onnx
        except ImportError:
            raise AdcError(f"{path}: reading an ONNX file needs onnx (pip install -e '.[deploy]')") from None
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and friends
            raise AdcError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
        raw = next((p.value for p in proto.metadata_props if p.key == RECORD_KEY), None)
    elif path.suffix == ".pt2":
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:  # read the record without deserialising the program
                name = next((n for n in zf.namelist() if n.endswith(f"/{RECORD_FILE}")), None)
                raw = zf.read(name).decode() if name else None
        except (zipfile.BadZipFile, OSError):
            raise AdcError(f"{path}: not a readable .pt2 file") from None
    else:
        raise AdcError(f"{path}: expected an exported .onnx or .pt2 file")
    if not raw:
        raise AdcError(f"{path}: no adc export record (not written by compress.export)")
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AdcError(f"{path}: the adc export record is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise AdcError(f"{path}: the adc export record has format {record.get('format') if isinstance(record, dict) else None!r}, "
                       f"expected {RECORD_FORMAT!r}")
    return record
