"""``quantize``: the run's student as an int8 ONNX file, shipped only if it is faster here and keeps quality.

The student is exported to fp32 ONNX (static at ``lr_size``, default ``task.lr_size``, or dynamic),
quantized with onnxruntime (:func:`compress.quantize.quantize_onnx`: QDQ, calibration on crops of
``data.train_hr``, per-layer sensitivity, the most sensitive layers kept fp32 until the bound holds),
then fp32 and int8 are timed on this machine and compared on held-out training crops
(:func:`compress.quantize.ship`). One file ships: ``student.int8.onnx`` when the gate passes, else
``student.fp32.onnx``, and the artifacts, ``quantize.md`` and the run's notes say why. Either file
runs with ``python -m compress.sr --model FILE.onnx``. The eval pairs are never used here.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import AdcError
from ..log import get_logger
from ..quantize.config import QuantizeConfig

__all__ = ["QuantizeConfig", "run_quantize", "run_quantize_needs"]

log = get_logger("quantize")


def run_quantize_needs(bundle, config: QuantizeConfig) -> list[str]:
    needs = []
    if not bundle.recipe.data.train_hr:
        needs.append("data.train_hr (HR images to calibrate int8 on; the eval pairs are never used)")
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            needs.append(f"{mod} (pip install -e '.[deploy]')")
    return needs


def run_quantize(bundle, config: QuantizeConfig, stage_dir: Path) -> dict[str, Any]:
    from ..deploy.export import export_model
    from ..deploy.record import check_export_target
    from ..io import make_dirs
    from ..quantize.calibration import calibration_set
    from ..quantize.onnx_int8 import quantize_onnx
    from ..quantize.report import sensitivity_csv, summary_markdown
    from ..quantize.ship import ship
    from ..io import atomic_write_text

    task = bundle.recipe.task
    lr_size = config.lr_size or task.lr_size
    state = bundle.student_state()
    if state.on_meta:
        raise AdcError("quantize: the student has no weights (a structure-only run); remove the quantize stage")
    model = state.model
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).cpu().float()
    threads = config.threads or torch.get_num_threads()
    cal = calibration_set(bundle.recipe.data.train_hr, lr_size, task.scale, config.calibration_images,
                          config.check_images, config.seed)
    make_dirs(stage_dir)
    work = Path(tempfile.mkdtemp(prefix=".work.", dir=stage_dir))
    try:
        fp32 = work / "student.fp32.onnx"
        exported = export_model(model, fp32, "onnx", lr_size, config.dynamic, None,
                                source=f"run {bundle.recipe.name}, student {bundle.rel(bundle.student_dir())}",
                                log=log.info)
        if exported.parity_ok is False:
            raise AdcError(f"quantize: the fp32 export differs from eager by {exported.max_abs:.2e} (> "
                           f"{exported.record['parity']['tolerance']:g}); not quantized")
        q = quantize_onnx(fp32, work / "student.int8.onnx", config, cal.calibration, threads=threads,
                          calibration_how=cal.how, log=log.info)
        targets = {name: stage_dir / f"student.{name}.onnx" for name in ("int8", "fp32")}
        for path in targets.values():  # an earlier attempt's file: the folder offers only what this one ships
            check_export_target(path)
            path.unlink(missing_ok=True)
        res = ship(fp32, q, config, cal.held_out, targets["int8"], targets["fp32"], threads=threads, log=log.info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    csv_path = stage_dir / "sensitivity.csv"
    if q.sensitivity:
        sensitivity_csv(q.sensitivity, csv_path)
    atomic_write_text(stage_dir / "quantize.md", summary_markdown(
        res.record, q.sensitivity, f"Quantize: {bundle.recipe.name} student", csv_path.name if q.sensitivity else None))
    if res.shipped == "fp32":
        bundle.note(f"quantize: {res.record['quantization']['verdict']}")
    c, quant = res.measured, res.record["quantization"]
    return {"shipped": res.shipped, "file": bundle.rel(res.path), "verdict": res.record["quantization"]["verdict"],
            "reasons": res.reasons, "latency_ms": c["latency_ms"], "speedup": c["speedup"], "bytes": c["bytes"],
            "psnr_int8_vs_fp32_db": c["psnr_db"], "max_abs_int8_vs_fp32": c["max_abs"], "check_images": c["images"],
            "device": c["device"], "threads": threads, "lr_size": c["size"], "dynamic": config.dynamic,
            "dtype": "int8 QDQ vs fp32", "method": config.method, "calibration": cal.how,
            "nodes": {"quantizable": quant["quantizable_nodes"], "int8": quant["quantized_nodes"],
                      "kept_fp32_by_config": len(quant["kept_fp32"]["config"]),
                      "kept_fp32_by_sensitivity": len(quant["kept_fp32"]["sensitivity"])},
            "sensitivity_csv": bundle.rel(csv_path) if q.sensitivity else None,
            "report": bundle.rel(stage_dir / "quantize.md")}
