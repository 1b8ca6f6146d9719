"""Static int8 quantization of an exported ``.onnx`` SR graph with onnxruntime, per-layer sensitivity,
and mixed precision (the most sensitive layers kept fp32 until the output meets a bound).

Why onnxruntime's tooling: ``quantize_static`` (QDQ format, per-channel int8 weights, calibrated
activations) is what onnxruntime's CPU kernels fuse into ``QLinearConv`` / ``QGemm``, and its
calibration cache lets every probe below reuse one calibration instead of re-running it.

What is quantized: Conv, Gemm, and MatMul whose second input is a weight. Attention's activation x
activation MatMuls (QK^T, attn x V) stay fp32 unless ``attention_int8``: quantized, they made the
tiny student at LR 128 slower than fp32 on this CPU (reports/quantization.md), the Q/DQ of a
4096 x 4096 score map costing more than the int8 product saves.

Sensitivity (what the library does not offer as one call): for each group of quantizable nodes
(module-path prefix, ``group_depth`` parts; coarser when there are more than ``max_groups``),
the graph with only that group quantized is scored against fp32 (PSNR of the [0, 1] images on
``sensitivity_images`` calibration crops). Mixed precision then keeps the most sensitive groups
fp32, in that order, until the quantized graph meets the bound on the same crops: the shortest
such prefix is found by doubling then bisection (a few quantizations, not one per group),
never keeping more than ``max_fp32_fraction`` of the nodes fp32.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import AdcError
from .config import QuantizeConfig

__all__ = ["OP_TYPES", "QuantizeResult", "quantize_onnx", "quantizable_nodes", "group_nodes", "image_psnr",
           "write_with_record", "quiet_quantizer"]

OP_TYPES = ("Conv", "MatMul", "Gemm")
Log = Callable[[str], None]


@dataclass
class QuantizeResult:
    """The written int8 file, its record, and the sensitivity table (one row per group, most sensitive first)."""

    path: Path
    record: dict[str, Any]
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    @property
    def quantization(self) -> dict[str, Any]:
        return self.record["quantization"]


class _RootOnly(logging.Filter):
    """Drops the quantizer's own lines (it logs through the root logger, one warning per tensor)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_quantizer():
    """onnxruntime.quantization's per-tensor warnings and its histogram calibrators' prints off (adc's
    loggers are not the root logger; a command's stdout stays its own)."""
    import io

    flt = _RootOnly()
    logging.root.addFilter(flt)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.root.removeFilter(flt)


def image_psnr(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> tuple[float, float]:
    """(PSNR dB of the [0, 1] images as written, clamped, over all pixels of all pairs; max abs in [-1, 1])."""
    se, n, worst = 0.0, 0, 0.0
    for g, w in zip(got, want):
        a, b = np.clip((g + 1) / 2, 0, 1), np.clip((w + 1) / 2, 0, 1)
        se += float(np.square(a.astype(np.float64) - b).sum())
        n += a.size
        worst = max(worst, float(np.abs(g - w).max()))
    mse = se / max(n, 1)
    return (math.inf if mse == 0 else 10 * math.log10(1 / mse)), worst


def quantizable_nodes(model, attention: bool = False) -> tuple[list[str], int]:
    """(names of the Conv / Gemm / weight-MatMul nodes, in graph order, with ``attention`` the activation x
    activation MatMuls too; how many activation MatMuls stay fp32)."""
    weights = {i.name for i in model.graph.initializer}
    weights |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names, fp32_matmuls = [], 0
    for node in model.graph.node:
        if node.op_type not in OP_TYPES or not node.name:
            continue
        if node.op_type == "MatMul" and not (len(node.input) > 1 and node.input[1] in weights) and not attention:
            fp32_matmuls += 1
            continue
        names.append(node.name)
    return names, fp32_matmuls


def group_nodes(names: Sequence[str], depth: int, max_groups: int) -> tuple[dict[str, list[str]], int]:
    """Nodes grouped by the first ``depth`` parts of their module path (0: each node alone), in graph
    order; the depth drops while there are more than ``max_groups`` groups, then neighbours merge."""

    def key(name: str, d: int) -> str:
        parts = name.split("/")
        return name if d == 0 or len(parts) <= d + 1 else "/".join(parts[:d + 1])

    def build(d: int) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(key(n, d), []).append(n)
        return groups

    groups = build(depth)
    d = depth or max(n.count("/") for n in names)
    while len(groups) > max_groups and d > 1:
        d -= 1
        groups, depth = build(d), d
    if len(groups) > max_groups:  # flat names: merge runs of neighbours
        items = list(groups.items())
        size = math.ceil(len(items) / max_groups)
        groups = {}
        for i in range(0, len(items), size):
            chunk = items[i:i + size]
            label = chunk[0][0] if len(chunk) == 1 else f"{chunk[0][0]} .. {chunk[-1][0]}"
            groups[label] = [n for _, ns in chunk for n in ns]
    return groups, depth


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_graph(path: Path, inputs: Sequence[np.ndarray], threads: int) -> list[np.ndarray]:
    sess = _session(path, threads)
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: x})[0] for x in inputs]


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of LR arrays."""

    def __init__(self, name: str, inputs: Sequence[np.ndarray]):
        self._it = iter([{name: x} for x in inputs])

    def get_next(self):
        return next(self._it, None)


def write_with_record(src: Path, dest: Path, record: dict[str, Any]) -> None:
    """``src`` with ``record`` as its adc metadata, written atomically to ``dest``."""
    import json

    import onnx

    from ..deploy.record import RECORD_KEY
    from ..io import atomic_path

    proto = onnx.load(str(src))
    keep = [p for p in proto.metadata_props if p.key != RECORD_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    proto.metadata_props.add(key=RECORD_KEY, value=json.dumps(record, sort_keys=True))
    with atomic_path(dest) as tmp:
        onnx.save_model(proto, str(tmp))


class _Quantizer:
    """One float graph, one calibration (cached in ``work``), many quantizations of node subsets."""

    def __init__(self, src: Path, work: Path, config: QuantizeConfig, calibration: Sequence[np.ndarray],
                 input_name: str, threads: int):
        from onnxruntime.quantization import CalibrationMethod, QuantType

        self.src, self.work, self.config, self.threads = src, work, config, threads
        self.cache = work / "calibration.json"
        self.calibration, self.input_name = calibration, input_name
        self.method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                       "entropy": CalibrationMethod.Entropy}[config.method]
        self.activation = QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8
        self.count = 0

    def quantize(self, nodes: Sequence[str], out: Path) -> Path:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        if not nodes:  # onnxruntime reads an empty list as "every node"
            raise AdcError("quantize: no node left to quantize (keep_fp32 matches them all)")
        extra = {"CalibPercentile": self.config.percentile} if self.config.method == "percentile" else {}
        reader = None if self.cache.is_file() else _Reader(self.input_name, self.calibration)
        with quiet_quantizer():
            quantize_static(str(self.src), str(out), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(OP_TYPES), per_channel=self.config.per_channel,
                            activation_type=self.activation, weight_type=QuantType.QInt8,
                            nodes_to_quantize=list(nodes), calibrate_method=self.method, extra_options=extra,
                            calibration_cache_path=str(self.cache))
        self.count += 1
        return out

    def score(self, nodes: Sequence[str], probes: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> tuple[float, float]:
        out = self.quantize(nodes, self.work / "probe.onnx")
        return image_psnr(run_graph(out, probes, self.threads), want)


def _meets(psnr: float, max_abs: float, config: QuantizeConfig) -> bool:
    return psnr >= config.min_psnr_vs_fp32 and (config.max_output_error is None or max_abs <= config.max_output_error)


def _keep_search(q: _Quantizer, candidates: list[str], order: list[list[str]], limit: int,
                 probes, want, log: Log) -> tuple[int, dict[int, tuple[float, float]]]:
    """The fewest leading groups of ``order`` kept fp32 that meet the bound (doubling, then bisection);
    ``limit`` groups at most. Returns (k, scores by k); k = limit when even that misses."""
    tried: dict[int, tuple[float, float]] = {}

    def score(k: int) -> tuple[float, float]:
        if k not in tried:
            keep = {n for g in order[:k] for n in g}
            tried[k] = q.score([n for n in candidates if n not in keep], probes, want)
            log(f"quantize: {k} most sensitive group(s) kept fp32: {tried[k][0]:.2f} dB")
        return tried[k]

    lo, k = 0, 1
    while True:
        k = min(k, limit)
        if _meets(*score(k), q.config):
            break
        if k == limit:
            return limit, tried
        lo, k = k, k * 2
    hi = k  # score(lo) misses, score(hi) meets
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _meets(*score(mid), q.config):
            hi = mid
        else:
            lo = mid
    return hi, tried


def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike, config: QuantizeConfig,
                  calibration_inputs: Sequence[np.ndarray], *, threads: int | None = None,
                  calibration_how: str = "", log: Log | None = None) -> QuantizeResult:
    """Quantize the adc export ``fp32_path`` to int8 QDQ at ``out_path``; returns its file, record and table.

    ``calibration_inputs``: LR arrays (1, 3, h, w) float32 in [-1, 1] that fit the graph (see
    :func:`compress.quantize.calibration_set`; never the eval pairs). The record is the fp32
    file's (what :class:`compress.deploy.runtime.OnnxSR` needs) plus a ``quantization`` section:
    the method, calibration, the nodes kept fp32 and why, and the int8-vs-fp32 score on the first
    ``sensitivity_images`` calibration crops. Whether the file is worth shipping is
    :func:`compress.quantize.ship`'s call (speed and held-out quality).
    """
    from ..deploy.record import check_export_target, read_export_record

    log = log or (lambda s: None)
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    record = read_export_record(fp32_path)
    if fp32_path.suffix != ".onnx" or out_path.suffix != ".onnx":
        raise AdcError(f"{fp32_path} -> {out_path}: quantize reads and writes .onnx files")
    if fp32_path.with_name(fp32_path.name + ".data").exists():
        raise AdcError(f"{fp32_path}: weights in an external .data file (a graph over 2 GiB) are not quantized here")
    if not calibration_inputs:
        raise AdcError("quantize: no calibration inputs")
    check_export_target(out_path)
    try:
        import onnx
        import onnxruntime
        from onnxruntime.quantization import quant_pre_process
    except ImportError:
        raise AdcError("quantize needs onnx and onnxruntime: pip install -e '.[deploy]'") from None
    import torch

    threads = threads or torch.get_num_threads()
    t0 = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        src = fp32_path
        if config.preprocess:
            log("quantize: onnxruntime quant_pre_process (shape inference, graph optimisation)")
            src = work / "pre.onnx"
            with quiet_quantizer():
                quant_pre_process(str(fp32_path), str(src))
        model = onnx.load(str(src), load_external_data=False)
        nodes, attention = quantizable_nodes(model, config.attention_int8)
        input_name = model.graph.input[0].name
        del model
        kept_config = [n for n in nodes if any(fnmatch.fnmatchcase(n, p) for p in config.keep_fp32)]
        for p in config.keep_fp32:
            if not any(fnmatch.fnmatchcase(n, p) for n in nodes):
                raise AdcError(f"quantize.keep_fp32: {p!r} matches no quantizable node (names look like "
                               f"{nodes[0] if nodes else '/model/...'!r}; the sensitivity table lists them)")
        candidates = [n for n in nodes if n not in kept_config]
        q = _Quantizer(src, work, config, calibration_inputs, input_name, threads)
        probes = list(calibration_inputs[:config.sensitivity_images])
        want = run_graph(src, probes, threads)
        log(f"quantize: calibrating on {len(calibration_inputs)} crops ({config.method}), "
            f"{len(candidates)} of {len(nodes)} nodes")
        full = image_psnr(run_graph(q.quantize(candidates, work / "int8.onnx"), probes, threads), want)
        log(f"quantize: all {len(candidates)} nodes int8: {full[0]:.2f} dB vs fp32 on {len(probes)} calibration crops")
        rows: list[dict[str, Any]] = []
        kept_sensitivity: list[str] = []
        final, sens_info = full, None
        if config.sensitivity:
            t1 = time.perf_counter()
            groups, depth = group_nodes(candidates, config.group_depth, config.max_groups)
            log(f"quantize: sensitivity of {len(groups)} groups (module depth {depth}), one int8 group at a time")
            ops = _op_types(src, candidates)
            for name, members in groups.items():
                psnr, worst = q.score(members, probes, want)
                rows.append({"group": name, "nodes": len(members), "op_types": ops_summary(members, ops),
                             "psnr_db": psnr, "max_abs": worst, "kept_fp32": False})
            rows.sort(key=lambda r: (r["psnr_db"], -r["max_abs"]))
            order = [groups[r["group"]] for r in rows]
            budget, limit = int(config.max_fp32_fraction * len(nodes)) - len(kept_config), 0
            while limit < len(order) and sum(len(g) for g in order[:limit + 1]) <= budget:
                limit += 1
            tried: dict[int, tuple[float, float]] = {}
            k = 0
            if not _meets(*full, config) and limit > 0:
                k, tried = _keep_search(q, candidates, order, limit, probes, want, log)
            for r in rows[:k]:
                r["kept_fp32"] = True
            kept_sensitivity = [n for g in order[:k] for n in g]
            final = tried.get(k, full)
            sens_info = {"groups": len(groups), "group_depth": depth, "probes": len(groups) + len(tried),
                         "images": len(probes), "seconds": round(time.perf_counter() - t1, 1),
                         "search": {str(kk): round(v[0], 3) for kk, v in sorted(tried.items())},
                         "max_fp32_nodes": max(budget, 0) + len(kept_config)}
        quantized = [n for n in candidates if n not in set(kept_sensitivity)]
        result_file = work / "int8.onnx"
        if kept_sensitivity:
            q.quantize(quantized, result_file)
        rec = dict(record)
        rec["precision"] = "int8 QDQ (onnxruntime)"
        rec["quantization"] = {
            "tool": f"onnxruntime.quantization.quantize_static (onnxruntime {onnxruntime.__version__})",
            "format": "QDQ", "weights": f"int8 {'per-channel' if config.per_channel else 'per-tensor'}",
            "activations": f"{config.activation_type} per-tensor", "method": config.method,
            **({"percentile": config.percentile} if config.method == "percentile" else {}),
            "preprocess": config.preprocess, "op_types": list(OP_TYPES),
            "activation_matmuls_fp32": attention,
            "calibration": {"images": len(calibration_inputs), "how": calibration_how,
                            "size": list(calibration_inputs[0].shape[-2:])},
            "quantizable_nodes": len(nodes), "quantized_nodes": len(quantized),
            "kept_fp32": {"config": kept_config, "sensitivity": kept_sensitivity},
            "bound": {"min_psnr_vs_fp32": config.min_psnr_vs_fp32, "max_output_error": config.max_output_error},
            "calibration_score": {"images": len(probes), "psnr_db": _num(final[0]), "max_abs": final[1],
                                  "all_int8_psnr_db": _num(full[0]), "meets_bound": _meets(*final, config),
                                  "on": "the first calibration crops (not held out)"},
            "sensitivity": sens_info, "fp32_file": fp32_path.name, "threads": threads,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write_with_record(result_file, out_path, rec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return QuantizeResult(out_path, rec, rows)


def _num(x: float) -> float | None:
    """JSON has no inf: identical outputs are recorded as None with the reason beside it."""
    return None if math.isinf(x) else round(x, 3)


def _op_types(src: Path, names: Sequence[str]) -> dict[str, str]:
    import onnx

    wanted = set(names)
    model = onnx.load(str(src), load_external_data=False)
    return {n.name: n.op_type for n in model.graph.node if n.name in wanted}


def ops_summary(members: Sequence[str], ops: dict[str, str]) -> str:
    from collections import Counter

    count = Counter(ops.get(m, "?") for m in members)
    return ", ".join(f"{op} x{c}" if c > 1 else op for op, c in sorted(count.items()))
