"""The quantize stage's report: the gate's verdict with what it measured, and the sensitivity table.

Every number names its device, threads, dtype, resolution and library versions (they move with
each of them); paths are file names only, so a report can be moved with its run.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Sequence

__all__ = ["sensitivity_csv", "summary_markdown", "sensitivity_markdown"]

COLUMNS = ("rank", "group", "nodes", "op_types", "psnr_db", "max_abs", "kept_fp32")


def sensitivity_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    from ..io import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for i, r in enumerate(rows, 1):
        psnr = "inf" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.3f}"
        w.writerow([i, r["group"], r["nodes"], r["op_types"], psnr, f"{r['max_abs']:.5f}", r["kept_fp32"]])
    atomic_write_text(path, buf.getvalue())


def sensitivity_markdown(rows: Sequence[dict[str, Any]], top: int = 15) -> list[str]:
    lines = ["| rank | group (only it int8) | nodes | ops | PSNR vs fp32 (dB) | max abs | kept fp32 |",
             "|---:|---|---:|---|---:|---:|:---:|"]
    for i, r in enumerate(rows[:top], 1):
        psnr = "identical" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.2f}"
        lines.append(f"| {i} | `{r['group']}` | {r['nodes']} | {r['op_types']} | {psnr} | {r['max_abs']:.4f} | "
                     f"{'yes' if r['kept_fp32'] else ''} |")
    if len(rows) > top:
        lines.append(f"\n({len(rows) - top} more rows, less sensitive, in the CSV.)")
    return lines


def summary_markdown(record: dict[str, Any], rows: Sequence[dict[str, Any]], title: str, csv_name: str | None,
                     top: int = 15) -> str:
    """The shipped file's ``quantization`` section as markdown (what shipped, why, measured how)."""
    q = record["quantization"]
    c = q["check"]
    size = "x".join(map(str, c["size"]))
    kept = q["kept_fp32"]
    psnr = "identical" if c["psnr_db"] is None else f"{c['psnr_db']:.2f} dB"
    lines = [f"# {title}", "", f"**{q['verdict']}**", "",
             f"Measured on {c['device']}; LR {size} -> x{record.get('scale', '?')}, batch 1, "
             f"{'dynamic' if record.get('dynamic') else 'static'} graph, colour fix {record.get('color_fix')}; "
             f"torch {record.get('torch_version')}, onnx {record.get('onnx_version')}.", "",
             "| | fp32 | int8 (QDQ) |", "|---|---:|---:|",
             f"| latency, median of {c['calls']} calls (fp32 and int8 alternating) | "
             f"{c['latency_ms']['fp32']:.1f} ms (IQR {c['iqr_ms']['fp32']:.1f}) | "
             f"{c['latency_ms']['int8']:.1f} ms (IQR {c['iqr_ms']['int8']:.1f}) |",
             f"| speed vs fp32 | 1.00x | {c['speedup']:.2f}x |",
             f"| file size | {c['bytes']['fp32'] / 2**20:.2f} MiB | {c['bytes']['int8'] / 2**20:.2f} MiB "
             f"({c['bytes']['int8'] / c['bytes']['fp32']:.2f}x) |",
             f"| PSNR vs fp32, {c['images']} held-out crops ([0, 1] images) | - | {psnr} |",
             f"| max abs vs fp32 ([-1, 1] output) | - | {c['max_abs']:.4f} |", "",
             f"Gate: int8 ships when it is at least {q['gate']['min_speedup']:g}x fp32's speed"
             f"{'' if q['gate']['speed_gate'] else ' (speed gate off)'} and at least "
             f"{q['gate']['min_psnr_vs_fp32']:g} dB from fp32"
             + (f" with max abs <= {q['gate']['max_output_error']:g}" if q['gate']['max_output_error'] is not None else "")
             + ".", "",
             f"Quantization: {q['tool']}, {q['format']}, weights {q['weights']}, activations {q['activations']}, "
             f"calibration {q['method']} on {q['calibration']['images']} crops ({q['calibration']['how'] or 'given inputs'}); "
             f"{q['quantized_nodes']} of {q['quantizable_nodes']} Conv/Gemm/weight-MatMul nodes int8, "
             f"{len(kept['sensitivity'])} kept fp32 by sensitivity, {len(kept['config'])} by keep_fp32; "
             f"{q['activation_matmuls_fp32']} attention (activation x activation) MatMuls stay fp32.", ""]
    s = q.get("sensitivity")
    if s:
        lines += ["## Sensitivity", "",
                  f"Each group (module path, depth {s['group_depth']}) quantized alone, the rest fp32; PSNR of the "
                  f"output vs fp32 on {s['images']} calibration crops at LR {size}; {s['groups']} groups, "
                  f"{s['probes']} quantizations in {s['seconds']:.0f} s. Most sensitive first"
                  + (f"; all rows: {csv_name}" if csv_name else "") + ".", ""]
        lines += sensitivity_markdown(rows, top)
        if s["search"]:
            steps = ", ".join(f"{k} kept: {v:.2f} dB" for k, v in s["search"].items())
            lines += ["", f"Mixed precision search (most sensitive groups kept fp32, calibration crops): {steps}."]
        lines.append("")
    return "\n".join(lines)
