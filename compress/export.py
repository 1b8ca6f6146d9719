"""``python -m compress.export MODEL --format onnx|torch-export``: a deployable file, checked against eager.

    python -m compress.export weights/ --format onnx --lr-size 128            # official AdcSR weights
    python -m compress.export runs/adcsr-tiny --format onnx --dynamic     # then: adc sr --model FILE.onnx
    python -m compress.export adcsr --size tiny --format torch-export --out tiny.pt2
    python -m compress.export runs/adcsr-tiny --quantize int8 --calibration data/samples/train   # + .int8.onnx

MODEL is what ``python -m compress.sr --model`` takes: an official AdcSR weights folder
(``net_params_*.pkl`` + ``halfDecoder.ckpt``), an adc run folder or its ``student/``, or a zoo
name with random weights. The file records how it was made (``--show FILE`` prints the record)
and its parity with eager PyTorch fp32; exit code 1 when that parity is above ``--tolerance``.
See :mod:`compress.deploy.export` for the graph's contract.

``--quantize int8`` then quantizes the ONNX file with onnxruntime (:mod:`compress.quantize`: QDQ,
calibrated on crops of the ``--calibration`` HR folders, never eval images) and writes
``<out>.int8.onnx`` beside it only if int8 is faster here by ``--min-speedup`` and within
``--min-psnr`` dB of fp32 on held-out crops; otherwise it says why and exits 1 (the fp32 file
stays, its record naming the verdict).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from .cli import prog, run_cli
from .config import float_in, int_in
from .deploy.record import (DEFAULT_EXPORTER, DEFAULT_OPSET, DEFAULT_TOLERANCE, EXPORT_FORMATS, EXPORTERS,
                            check_export_target, default_path)
from .errors import AdcError

__all__ = ["main"]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _lr_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or HxW, e.g. 128 or 96x128") from None
    if len(sides) == 1:
        return sides[0], sides[0]
    if len(sides) == 2:
        return sides[0], sides[1]
    raise argparse.ArgumentTypeError(f"{text!r}: expected N or HxW, e.g. 128 or 96x128")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("export"),
                                description="Export an adc SR model to ONNX or torch.export, with a parity check "
                                            "against eager PyTorch and a record of how the file was made.")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="official AdcSR weights folder, adc run folder (or its student/), or a zoo name (adcsr)")
    p.add_argument("--format", default="onnx", choices=tuple(EXPORT_FORMATS), help="onnx (default) or torch-export (.pt2)")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (default: exports/<model>-<size|dyn>-<fix|nofix>.onnx|.pt2); an existing one "
                        "is replaced only if it is an adc export")
    p.add_argument("--lr-size", type=_lr_size, default=(128, 128), metavar="N|HxW",
                   help="example LR size, a multiple of 16 (128); the only size a static graph runs")
    p.add_argument("--dynamic", action="store_true", help="any LR size that is a multiple of 16 (batch stays 1)")
    p.add_argument("--color-fix", choices=("inside", "outside", "none"), default=None,
                   help="AdcSR's colour match in the graph (inside, the default for AdcSR: the file alone is the "
                        "official test.py; compress.sr runs it with no second fix, per tile when tiled) or left "
                        "to the runner (outside: compress.sr applies it once over the whole image, also tiled)")
    p.add_argument("--size", default="full", choices=("full", "tiny"), help="model widths (official weights: full)")
    p.add_argument("--opset", type=int_in(1, 99), default=DEFAULT_OPSET, help=f"ONNX opset ({DEFAULT_OPSET})")
    p.add_argument("--exporter", default=DEFAULT_EXPORTER, choices=EXPORTERS,
                   help=f"ONNX exporter: {DEFAULT_EXPORTER} (default: 2-3x faster to export, the same parity) "
                        "or torch.onnx's dynamo one")
    p.add_argument("--tolerance", type=float_in(0.0, 2.0), default=DEFAULT_TOLERANCE,
                   help=f"max abs difference to eager fp32 accepted by the parity check ({DEFAULT_TOLERANCE:g})")
    p.add_argument("--no-check", action="store_true", help="skip the parity check (no onnxruntime needed)")
    p.add_argument("--threads", type=int_in(0, 1024), default=0, help="torch CPU threads (0: torch's default)")
    q = p.add_argument_group("int8 quantization (ONNX, onnxruntime CPU)")
    q.add_argument("--quantize", choices=("int8",), default=None,
                   help="also write <out>.int8.onnx (static QDQ int8) if it passes the speed and quality gate")
    q.add_argument("--calibration", type=Path, action="append", default=None, metavar="DIR",
                   help="HR image folder(s) to calibrate on (training images, never the eval set); repeatable")
    q.add_argument("--calibration-images", type=int_in(1, 10000), default=16, help="LR crops that set the ranges (16)")
    q.add_argument("--quant-method", choices=("minmax", "percentile", "entropy"), default="minmax",
                   help="onnxruntime calibration method (minmax)")
    q.add_argument("--min-psnr", type=float_in(0.0, 200.0), default=35.0,
                   help="int8 must be within this PSNR (dB) of fp32 on held-out crops (35)")
    q.add_argument("--min-speedup", type=float_in(0.0, 100.0), default=1.2,
                   help="int8 must be this many times fp32's speed here (1.2; 0 turns the speed gate off)")
    q.add_argument("--no-sensitivity", action="store_true",
                   help="no per-layer sensitivity (faster): every Conv/Gemm/weight-MatMul int8")
    p.add_argument("--show", type=Path, default=None, metavar="FILE", help="print the record of an exported file and exit")
    return p


def _stem(spec: str, size: str) -> str:
    path = Path(spec)
    return path.resolve().name if path.exists() else f"{spec}-{size}"


def run(args: argparse.Namespace) -> int:
    from .deploy.record import read_export_record

    if args.show is not None:
        print(json.dumps(read_export_record(args.show), indent=2, sort_keys=True))
        return 0
    if args.model is None:
        raise AdcError("MODEL is required (or --show FILE)")
    if args.threads < 0:
        raise AdcError(f"--threads {args.threads}: expected >= 0")
    if args.out is not None and args.out.suffix != EXPORT_FORMATS[args.format]:
        raise AdcError(f"--out {args.out}: a {args.format} file must end in {EXPORT_FORMATS[args.format]}")
    if args.out is not None:
        check_export_target(args.out)  # before the model loads; export_model checks the default path
    if args.quantize is None and args.calibration:
        raise AdcError("--calibration is for --quantize int8")
    if args.quantize is not None:
        if args.format != "onnx":
            raise AdcError(f"--quantize {args.quantize}: quantizes ONNX files (--format onnx), not {args.format}")
        if not args.calibration:
            raise AdcError("--quantize int8 needs --calibration DIR: HR images to calibrate on (e.g. the training "
                           "images; never the eval set)")
        if args.no_check:
            raise AdcError("--quantize needs the parity check (onnxruntime): drop --no-check")
        from .data.images import list_images

        for folder in args.calibration:
            if not list_images(folder):
                raise AdcError(f"--calibration {folder}: holds no images (.png, .jpg, ..., searched recursively)")
    import torch

    from .deploy.export import export_model
    from .sr import load_sr_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_sr_model(args.model, args.size, "cpu", log=_stderr)
    fix = args.color_fix
    if fix is None:
        fix = "inside" if getattr(model, "color_fix", False) else "none"
    out = args.out or default_path(_stem(args.model, args.size), args.format, args.lr_size, args.dynamic, fix)
    path = Path(args.model)
    source = f"{path.resolve()}" if path.exists() else f"zoo:{args.model} ({args.size}, random weights)"
    res = export_model(model, out, args.format, args.lr_size, args.dynamic, fix, opset=args.opset,
                       exporter=args.exporter, source=source, check=not args.no_check, tolerance=args.tolerance,
                       log=_stderr)
    rec = res.record
    parity = rec.get("parity")
    check = ("parity not checked" if parity is None else
             f"max abs vs eager fp32 {parity['max_abs']:.2e} at {', '.join('x'.join(map(str, s)) for s in parity['sizes'])} "
             f"({'ok' if parity['ok'] else 'ABOVE'} tolerance {parity['tolerance']:g})")
    print(f"wrote {res.path} ({args.format}, {'dynamic' if rec['dynamic'] else 'static'} "
          f"{rec['lr_size'][0]}x{rec['lr_size'][1]}, colour fix {rec['color_fix']}); {check}; "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if parity is not None and not parity["ok"]:
        _stderr(f"error: parity check failed: max abs {parity['max_abs']:.2e} > {parity['tolerance']:g} "
                f"(the file is kept, with this result in its record)")
        return 1
    if args.quantize is not None:
        return _quantize(args, res.path, rec)
    return 0


def _quantize(args: argparse.Namespace, fp32: Path, rec: dict) -> int:
    """int8 beside the fp32 export, if the gate passes (compress.quantize)."""
    import shutil
    import tempfile

    from .quantize import QuantizeConfig, calibration_set, quantize_onnx, ship

    config = QuantizeConfig(method=args.quant_method, calibration_images=args.calibration_images,
                            min_psnr_vs_fp32=args.min_psnr, min_speedup=args.min_speedup,
                            speed_gate=args.min_speedup > 0, sensitivity=not args.no_sensitivity)
    t0 = time.perf_counter()
    cal = calibration_set(args.calibration, tuple(rec["lr_size"]), rec["scale"], config.calibration_images,
                          config.check_images, config.seed)
    int8 = fp32.with_name(fp32.stem + ".int8.onnx")
    check_export_target(int8)
    work = Path(tempfile.mkdtemp(prefix=f".{fp32.stem}.", dir=fp32.parent))
    try:
        q = quantize_onnx(fp32, work / int8.name, config, cal.calibration, calibration_how=cal.how, log=_stderr)
        res = ship(fp32, q, config, cal.held_out, int8, fp32, log=_stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if res.shipped == "int8":
        c = res.measured
        print(f"wrote {res.path} (int8 QDQ, {c['speedup']:.2f}x fp32's speed on this CPU, "
              f"{c['bytes']['int8'] / c['bytes']['fp32']:.2f}x its size, "
              f"{'identical to' if c['psnr_db'] is None else format(c['psnr_db'], '.2f') + ' dB from'} fp32); "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        return 0
    stale = int8.is_file()
    int8.unlink(missing_ok=True)  # an earlier int8 export of adc's (checked above) is not left to be taken for this one
    _stderr(f"error: int8 not written{' (the earlier ' + int8.name + ' removed)' if stale else ''}: "
            f"{'; '.join(res.reasons)} ({fp32} keeps the fp32 graph, with this verdict in its record)")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
