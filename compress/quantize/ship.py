"""The ship gate: the int8 file ships only if it is faster than fp32 here and keeps the quality bound.

Why measured, never assumed: int8 is not faster everywhere. On a small graph Q/DQ overhead eats the
gain, and attention's fp32 MatMuls bound what quantized convolutions can save (reports/quantization.md).
fp32 and int8 are timed in one process, calls alternating one by one, with the same onnxruntime threads,
through :class:`compress.deploy.runtime.OnnxSR` (the session ``compress.sr`` runs, so a QDQ file
that loads here loads there), median of every timed call. Quality is int8 against fp32 on LR crops
held out of the calibration. Exactly one file ships, ``<stem>.int8.onnx`` or ``<stem>.fp32.onnx``;
its record's ``quantization`` section says which, why, and what was measured; a refused int8
file is not written anywhere.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import AdcError
from .config import QuantizeConfig
from .onnx_int8 import QuantizeResult, _num, image_psnr, write_with_record

__all__ = ["ShipResult", "measure_pair", "gate", "ship"]

Log = Callable[[str], None]


@dataclass
class ShipResult:
    path: Path
    record: dict[str, Any]
    shipped: str           # "int8" or "fp32"
    reasons: list[str]     # why int8 did not ship (empty when it did)
    measured: dict[str, Any]


def measure_pair(fp32_path: Path, int8_path: Path, inputs: Sequence[np.ndarray], threads: int, warmup: int,
                 repeats: int, rounds: int = 2) -> dict[str, Any]:
    """Latency of fp32 and int8 in this process, and int8-vs-fp32 quality on ``inputs``.

    Calls alternate one by one (fp32, int8, fp32, ...; ``rounds * repeats`` each, after ``warmup``
    each), timed with ``time.perf_counter`` around the session call, so that a burst of load on a
    shared machine lands on both. Timed in blocks of 10 calls per model (``measure_latency``), the
    same tiny-student pair measured 1.07x in one run and 1.90x in another on this 2-core machine.
    """
    import time

    import onnxruntime
    import torch

    from ..deploy.record import read_export_record
    from ..deploy.runtime import OnnxSR
    from ..profile.latency import device_name

    models = {name: OnnxSR(p, read_export_record(p), "cpu", threads) for name, p in
              (("fp32", fp32_path), ("int8", int8_path))}
    outs = {name: [m.run(torch.from_numpy(x)).numpy() for x in inputs] for name, m in models.items()}
    psnr, worst = image_psnr(outs["int8"], outs["fp32"])
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    x = torch.from_numpy(inputs[0])
    for m in models.values():
        for _ in range(warmup):
            m.run(x)
    for _ in range(rounds * repeats):
        for name, m in models.items():
            t = time.perf_counter()
            m.run(x)
            times[name].append((time.perf_counter() - t) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    iqr = {k: (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) if len(v) > 1 else 0.0
           for k, v in times.items()}
    cpu = device_name("cpu").split(" (")[0]
    return {"psnr_db": _num(psnr), "max_abs": worst, "images": len(inputs), "size": list(inputs[0].shape[-2:]),
            "latency_ms": {k: round(v, 3) for k, v in med.items()}, "iqr_ms": {k: round(v, 3) for k, v in iqr.items()},
            "speedup": med["fp32"] / med["int8"], "calls": len(times["fp32"]), "timing": "calls alternated one by one",
            "device": f"{cpu}, onnxruntime {onnxruntime.__version__} CPUExecutionProvider, {threads} thread(s), "
                      f"{os.cpu_count()} logical CPUs", "threads": threads,
            "bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size}}


def gate(measured: dict[str, Any], config: QuantizeConfig) -> list[str]:
    """Why int8 must not ship (empty: it ships)."""
    reasons = []
    psnr = measured["psnr_db"]
    if psnr is not None and psnr < config.min_psnr_vs_fp32:
        reasons.append(f"int8 is {psnr:.2f} dB from fp32 on {measured['images']} held-out crops, "
                       f"below min_psnr_vs_fp32 {config.min_psnr_vs_fp32:g} dB")
    if config.max_output_error is not None and measured["max_abs"] > config.max_output_error:
        reasons.append(f"int8 max abs error {measured['max_abs']:.3g} > max_output_error {config.max_output_error:g}")
    if config.speed_gate and measured["speedup"] < config.min_speedup:
        reasons.append(f"int8 is {measured['speedup']:.2f}x fp32's speed ({measured['latency_ms']['int8']:.1f} vs "
                       f"{measured['latency_ms']['fp32']:.1f} ms), below min_speedup {config.min_speedup:g}x")
    return reasons


def ship(fp32_path: str | os.PathLike, quantized: QuantizeResult, config: QuantizeConfig,
         held_out: Sequence[np.ndarray], int8_target: str | os.PathLike, fp32_target: str | os.PathLike, *,
         threads: int | None = None, log: Log | None = None) -> ShipResult:
    """Measure fp32 vs int8, apply the gate, and write the winner to ``int8_target`` or ``fp32_target``
    (which may be ``fp32_path`` itself) with the verdict in its record. Nothing else is written."""
    import torch

    from ..deploy.record import check_export_target, read_export_record

    log = log or (lambda s: None)
    if not held_out:
        raise AdcError("quantize: no held-out inputs for the check")
    fp32_path = Path(fp32_path)
    threads = threads or torch.get_num_threads()
    log(f"quantize: timing fp32 and int8 ({2 * config.repeats} alternating calls each, {threads} thread(s)) and "
        f"checking them on {len(held_out)} held-out crops")
    measured = measure_pair(fp32_path, quantized.path, held_out, threads, config.warmup, config.repeats)
    reasons = gate(measured, config)
    shipped = "fp32" if reasons else "int8"
    gate_off = "" if config.speed_gate else " (speed gate off)"
    verdict = (f"int8 shipped: {measured['speedup']:.2f}x fp32's speed{gate_off}, {_db(measured['psnr_db'])} vs fp32"
               if not reasons else
               "fp32 shipped: " + "; ".join(reasons))
    section = dict(quantized.quantization)
    section.update(shipped=shipped, verdict=verdict, reasons=reasons, check=measured,
                   gate={"speed_gate": config.speed_gate, "min_speedup": config.min_speedup,
                         "min_psnr_vs_fp32": config.min_psnr_vs_fp32, "max_output_error": config.max_output_error})
    if shipped == "int8":
        src, record, target = quantized.path, dict(quantized.record), Path(int8_target)
    else:
        src, record, target = fp32_path, dict(read_export_record(fp32_path)), Path(fp32_target)
        record["precision"] = "fp32"
    record["quantization"] = section
    check_export_target(target)
    write_with_record(src, target, record)
    log(f"quantize: {verdict}")
    return ShipResult(target, record, shipped, reasons, measured)


def _db(psnr: float | None) -> str:
    return "identical" if psnr is None else f"{psnr:.2f} dB"
