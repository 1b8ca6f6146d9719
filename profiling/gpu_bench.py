"""OSEDiff vs AdcSR latency on one GPU at LR 128 -> SR 512, in one run -> reports/gpu-latency.{md,csv}.

    python -m profiling.gpu_bench [--device cuda] [--size full|tiny] [--lr-size 128]
        [--dtypes fp16,bf16,fp32] [--modes eager,compile,compile-cudagraphs,onnx] [--warmup 10] [--repeats 30]
        [--channels-last] [--tf32] [--models osediff,adcsr] [--out reports] [--budget-s 240] [--threads 0]

Meant to be started by ``profiling/gpu_bench.sh`` on a CUDA machine; ``--size tiny --device cpu``
is a dry run of the same code (tests use it). Why this protocol: random-init full-size models
(latency does not depend on the weights' values, and no checkpoint is needed), the same pipeline
that :mod:`profiling.compare` counts (OSEDiff: DAPE tag path + text encode + VAE encode + UNet +
decode, LoRA merged as OSEDiff times it; AdcSR: its whole forward), both models measured in the
same run on the same GPU so every OSEDiff/AdcSR ratio comes from one run. Each call is bracketed by
CUDA events and synchronised (:func:`compress.profile.latency.measure_latency`): median and IQR
over ``--repeats`` calls after ``--warmup`` calls; peak memory from one extra call.

Modes: ``eager``; ``compile`` (``torch.compile``, default mode; compile + first call timed apart);
``compile-cudagraphs`` (``mode="reduce-overhead"``: CUDA graphs remove kernel-launch overhead);
``onnx`` (AdcSR only, fp32: exported by :mod:`compress.deploy.export` and run by onnxruntime's CUDA
provider with I/O bound to GPU tensors; skipped when onnxruntime has no CUDA provider).

Order under ``--budget-s``: every eager row first (cheap, and the OSEDiff/AdcSR ratio needs both),
then the bf16 rows of the other modes (AdcSR before OSEDiff), ONNX, then fp16 and fp32. A row that
cannot start before the deadline (a compile needs a margin) is listed as skipped. The report is
rewritten after every row, so a run stopped from outside still leaves what it measured.
Half-precision weights are cast from the fp32 init (dtype switches cast the same model in place).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from compress.cli import run_cli
from compress.errors import AdcError
from compress.io import atomic_write_text
from compress.profile.latency import LatencyReport, device_name, measure_latency
from profiling.compare import SPECS, _env, _fmt_df, _num_threads, pipeline_calls

__all__ = ["GpuBenchOptions", "BenchRow", "plan_rows", "run_bench", "render_markdown", "tidy_table", "main"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ORDER = ("fp32", "bf16", "fp16")  # eager: fp32 first, half copies are cast from the fp32 init
MODES = ("eager", "compile", "compile-cudagraphs", "onnx")
_COMPILE_KW = {"compile": {}, "compile-cudagraphs": {"mode": "reduce-overhead"}}
# Seconds a compiled row needs left before it starts (compile + warm-up + repeats), from full-size
# compiles on 16 CPU cores; a row that does not fit is skipped rather than overrunning the budget.
_COMPILE_MARGIN_S = {"adcsr": 75.0, "osediff": 180.0, "s3diff": 240.0}
_ONNX_MARGIN_S = 90.0
GOAL_ADCSR_MS = 10.0  # AdcSR 128 -> 512, bf16, compiled
GOAL_RATIO = 4.0  # OSEDiff / AdcSR, same run


@dataclass
class GpuBenchOptions:
    device: str = "cuda"
    size: str = "full"
    lr_size: int = 128
    dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32")
    warmup: int = 10
    repeats: int = 30
    modes: tuple[str, ...] = ("eager",)
    channels_last: bool = False
    tf32: bool = False
    models: tuple[str, ...] = ("osediff", "adcsr")
    out: str = "reports"
    budget_s: float = 240.0
    threads: int = 0

    def check(self) -> None:
        if self.size not in ("full", "tiny"):
            raise AdcError(f"--size {self.size!r}: expected full or tiny")
        if self.lr_size < 16 or self.lr_size % 16:
            raise AdcError(f"--lr-size {self.lr_size}: expected a multiple of 16 (AdcSR), >= 16")
        bad = [d for d in self.dtypes if d not in _DTYPES]
        if bad or not self.dtypes:
            raise AdcError(f"--dtypes {','.join(self.dtypes)}: expected a subset of fp32,bf16,fp16")
        bad = [m for m in self.models if m not in SPECS]
        if bad or not self.models:
            raise AdcError(f"--models {','.join(self.models)}: expected a subset of {','.join(SPECS)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise AdcError(f"--modes {','.join(self.modes)}: expected a subset of {','.join(MODES)}")
        if self.warmup < 0 or self.repeats < 1:
            raise AdcError(f"--warmup {self.warmup} / --repeats {self.repeats}: expected >= 0 / >= 1")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise AdcError(f"--device {self.device}: torch {torch.__version__} sees no CUDA GPU "
                           f"(CUDA build: {torch.version.cuda or 'none'}); run on a GPU machine or use --device cpu")
        if dev.type not in ("cuda", "cpu"):
            raise AdcError(f"--device {self.device!r}: expected cuda, cuda:N or cpu")


@dataclass
class BenchRow:
    """One (model, dtype, mode) measurement, or why it was skipped."""

    model: str
    dtype: str
    report: LatencyReport | None
    finite: bool | None
    build_s: float
    skipped: str = ""
    mode: str = "eager"
    note: str = ""


@dataclass
class BenchResult:
    options: GpuBenchOptions
    rows: list[BenchRow]
    command: str
    started: str
    device_name: str
    seconds: float = 0.0
    env: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 for fp32 matmul/conv inside the block only (torch defaults: matmul off, cuDNN conv on)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def plan_rows(o: GpuBenchOptions) -> list[tuple[str, str, str]]:
    """(model, dtype, mode) in the order they are measured (see the module doc)."""
    models = [m for m in ("adcsr", "osediff", "s3diff") if m in o.models]
    eager = [(m, d, "eager") for m in o.models for d in _ORDER if d in o.dtypes] if "eager" in o.modes else []
    rest = []
    for d in ("bf16", "fp16", "fp32"):
        if d not in o.dtypes:
            continue
        for mode in ("compile", "compile-cudagraphs"):
            if mode in o.modes:
                rest += [(m, d, mode) for m in models]
        if d == "bf16" and "onnx" in o.modes and "adcsr" in o.models:
            rest.append(("adcsr", "fp32", "onnx"))  # exported fp32 graph: right after the headline bf16 rows
    if "onnx" in o.modes and "adcsr" in o.models and "bf16" not in o.dtypes:
        rest.append(("adcsr", "fp32", "onnx"))
    return eager + rest


def _skip(model: str, dtype: str, mode: str, why: str, build_s: float = 0.0) -> BenchRow:
    return BenchRow(model, dtype, None, None, build_s, why, mode)


def _time_torch(name: str, model, d: str, mode: str, o: GpuBenchOptions, build_s: float, log) -> BenchRow:
    spec = SPECS[name]
    lr32 = torch.rand(1, 3, o.lr_size, o.lr_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lr = lr32.to(device=o.device, dtype=_DTYPES[d])  # measure_latency casts the module, not the closure
    calls = pipeline_calls(spec, model, lr)
    last: list[Any] = [None]

    def run() -> Any:
        out = None
        for _, fn, args in calls:
            out = fn(*args)
        last[0] = out  # kept, not checked: a check would synchronise inside the timed call
        return out

    compiled = mode in _COMPILE_KW
    if compiled:
        torch._dynamo.reset()  # one compiled graph at a time: no cache limit, no stale guards
    try:
        rep = measure_latency(run, device=o.device, module=model, dtype=d, warmup=o.warmup, repeats=o.repeats,
                              channels_last=o.channels_last, compile=compiled,
                              compile_kwargs=_COMPILE_KW.get(mode, {}))
    except Exception as exc:  # an op without a kernel for this dtype, OOM, a compiler failure: report, go on
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        log(f"{name} {d} {mode}: failed: {first}")
        return BenchRow(name, d, None, None, build_s, f"failed: {type(exc).__name__}: {first}", mode)
    finite = bool(torch.isfinite(last[0]).all().item()) if isinstance(last[0], torch.Tensor) else None
    log(f"{name} {d} {mode}: median {rep.median_ms:.2f} ms (IQR {rep.q1_ms:.2f}-{rep.q3_ms:.2f}), finite={finite}")
    return BenchRow(name, d, rep, finite, build_s, mode=mode)


def _time_onnx(o: GpuBenchOptions, log) -> BenchRow:
    """AdcSR exported to ONNX (fp32, static, colour fix inside) on onnxruntime's CUDA provider (CPU on a dry run)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return _skip("adcsr", "fp32", "onnx", "onnxruntime is not installed")
    dev = torch.device(o.device)
    provider = "CUDAExecutionProvider" if dev.type == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return _skip("adcsr", "fp32", "onnx", f"onnxruntime {ort.__version__} has no {provider} "
                                              f"(has {', '.join(ort.get_available_providers())}): needs onnxruntime-gpu")
    import tempfile

    from compress.deploy.export import export_model
    from compress.zoo.adcsr import build_adcsr

    t0 = time.perf_counter()
    torch.manual_seed(0)
    cpu_model = build_adcsr(o.size, "cpu")
    with tempfile.TemporaryDirectory(prefix="adc-gpu-onnx-") as tmp:
        try:
            res = export_model(cpu_model, Path(tmp) / "adcsr.onnx", "onnx", o.lr_size, False, "inside",
                               source=f"zoo:adcsr ({o.size}, seed 0)", check=False)
            opts = ort.SessionOptions()
            sess = ort.InferenceSession(str(res.path), opts, providers=[provider])
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            return _skip("adcsr", "fp32", "onnx", f"export or session failed: {type(exc).__name__}: {first}")
        setup = time.perf_counter() - t0
        lr32 = torch.rand(1, 3, o.lr_size, o.lr_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad():
            want = cpu_model(lr32)
        del cpu_model
        x = lr32.to(dev).contiguous()
        y = torch.empty(1, 3, 4 * o.lr_size, 4 * o.lr_size, device=dev)
        binding = sess.io_binding()
        kind, index = ("cuda", dev.index or 0) if dev.type == "cuda" else ("cpu", 0)
        import numpy as np

        binding.bind_input("lr", kind, index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output("sr", kind, index, np.float32, tuple(y.shape), y.data_ptr())

        def run(sess=sess) -> torch.Tensor:
            sess.run_with_iobinding(binding)  # returns after the provider has synchronised
            return y

        rep = measure_latency(run, device=o.device, warmup=o.warmup, repeats=o.repeats)
        max_abs = float((y.cpu() - want).abs().max())
        finite = bool(torch.isfinite(y).all().item())
        del sess
    log(f"adcsr onnx ({provider}): median {rep.median_ms:.2f} ms, max abs vs CPU eager fp32 {max_abs:.1e}")
    return BenchRow("adcsr", "fp32", rep, finite, setup, mode="onnx",
                    note=f"onnxruntime {ort.__version__} {provider}, I/O bound to device tensors; max abs vs CPU "
                         f"eager fp32 {max_abs:.1e}; setup (build + export + session) {setup:.0f} s")


def run_bench(o: GpuBenchOptions, command: str, log=lambda s: None,
              on_row: Callable[[BenchResult], None] | None = None) -> BenchResult:
    from compress.zoo import build
    from compress.zoo.lora import merge_and_unload

    o.check()
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    deadline = t0 + o.budget_s
    res = BenchResult(o, [], command, started, device_name(o.device), env=_env())
    models: dict[str, Any] = {}
    build_s: dict[str, float] = {}
    with _num_threads(o.threads), _tf32(o.tf32):
        res.device_name = device_name(o.device)
        for name, d, mode in plan_rows(o):
            left = deadline - time.perf_counter()
            need = (_COMPILE_MARGIN_S.get(name, 120.0) if mode in _COMPILE_KW else
                    _ONNX_MARGIN_S if mode == "onnx" else 0.0) * (1.0 if o.size == "full" else 0.0)
            if left <= 0 or left < need:
                res.rows.append(_skip(name, d, mode, f"--budget-s {o.budget_s:g}: {max(left, 0):.0f} s left, "
                                                     f"this row needs about {need:.0f} s"))
                continue
            if mode == "onnx":
                res.rows.append(_time_onnx(o, log))
            else:
                if name not in models:
                    t1 = time.perf_counter()
                    model = build(name, o.size, o.device)
                    if SPECS[name].mergeable_lora:
                        merge_and_unload(model)
                    build_s[name] = time.perf_counter() - t1
                    models[name] = model
                    log(f"{name}: built on {o.device} in {build_s[name]:.0f} s")
                res.rows.append(_time_torch(name, models[name], d, mode, o, build_s[name], log))
            res.seconds = time.perf_counter() - t0
            if on_row is not None:
                on_row(res)
    models.clear()
    gc.collect()
    if torch.device(o.device).type == "cuda":
        torch.cuda.empty_cache()
    res.seconds = time.perf_counter() - t0
    return res


def _res(o: GpuBenchOptions) -> str:
    return f"LR {o.lr_size}x{o.lr_size} -> SR {4 * o.lr_size}x{4 * o.lr_size}, batch 1"


def _settings(o: GpuBenchOptions) -> str:
    return f"{'channels_last' if o.channels_last else 'contiguous'}, TF32 {'on' if o.tf32 else 'torch default'}"


def _mode_title(mode: str) -> str:
    return {"eager": "eager", "compile": "torch.compile", "compile-cudagraphs": "torch.compile reduce-overhead",
            "onnx": "ONNX (onnxruntime)"}[mode]


def _ratios(res: BenchResult) -> dict[tuple[str, str], tuple[float, float]]:
    """(dtype, mode) -> (OSEDiff median ms, AdcSR median ms), where both were measured."""
    by = {(r.model, r.dtype, r.mode): r.report for r in res.rows if r.report is not None}
    return {(d, m): (by[("osediff", d, m)].median_ms, by[("adcsr", d, m)].median_ms)
            for m in MODES for d in _ORDER if ("osediff", d, m) in by and ("adcsr", d, m) in by}


def _goals(res: BenchResult) -> list[str]:
    by = {(r.model, r.dtype, r.mode): r.report for r in res.rows if r.report is not None}
    lines = []
    best = min((by[k].median_ms, k[2]) for k in by if k[0] == "adcsr" and k[1] == "bf16" and k[2] in _COMPILE_KW) \
        if any(k[0] == "adcsr" and k[1] == "bf16" and k[2] in _COMPILE_KW for k in by) else None
    if best:
        lines.append(f"- AdcSR {_res(res.options)}, bf16, {_mode_title(best[1])}: **{best[0]:.2f} ms** "
                     f"(goal <= {GOAL_ADCSR_MS:g} ms: {'reached' if best[0] <= GOAL_ADCSR_MS else 'not reached'}).")
    else:
        lines.append("- AdcSR bf16 compiled: not measured in this run.")
    rat = _ratios(res)
    if rat:
        (d, m), (t, a) = max(rat.items(), key=lambda kv: kv[1][0] / kv[1][1])
        lines.append(f"- OSEDiff/AdcSR, same run: best {t / a:.2f}x ({d}, {_mode_title(m)}); "
                     f"goal >= {GOAL_RATIO:g}x: {'reached' if t / a >= GOAL_RATIO else 'not reached'}.")
    return lines


def render_markdown(res: BenchResult) -> str:
    o = res.options
    dev = torch.device(o.device)
    lines = [f"Generated by: `{res.command}` (started {res.started}, took {res.seconds:.0f} s)\n",
             "# GPU latency: OSEDiff vs AdcSR\n"]
    if dev.type != "cuda":
        lines.append(f"**DRY RUN on {o.device} ({res.device_name}), `{o.size}` models: not a GPU measurement.**\n")
    cuda = f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if dev.type == "cuda" else ""
    lines.append(f"Device: **{res.device_name}** [{o.device}]{cuda}. "
                 + ", ".join(f"{k} {v}" for k, v in res.env.items())
                 + f". Models: `{o.size}` size, random init. {_res(o)}. {_settings(o)}.\n")
    lines += _goals(res) + [""]
    rows = []
    for r in res.rows:
        base = {"model": SPECS[r.model].title, "dtype": r.dtype, "mode": _mode_title(r.mode)}
        if r.report is None:
            rows.append({**base, "median (ms)": "-", "IQR (ms)": "-", "min (ms)": "-", "peak memory (GiB)": "-",
                         "finite output": "-", "note": r.skipped})
            continue
        rep = r.report
        note = f"{rep.repeats} calls after {rep.warmup} warm-up"
        if rep.compiled and rep.compile_time_s is not None:
            note += f"; compile + first call {rep.compile_time_s:.1f} s"
        if r.note:
            note += f"; {r.note}"
        rows.append({**base, "median (ms)": f"{rep.median_ms:.2f}", "IQR (ms)": f"{rep.q1_ms:.2f}-{rep.q3_ms:.2f}",
                     "min (ms)": f"{rep.min_ms:.2f}",
                     "peak memory (GiB)": f"{rep.peak_memory_bytes / 2**30:.2f}" if rep.peak_memory_bytes else "-",
                     "finite output": str(r.finite), "note": note})
    lines.append(f"## Latency per model, dtype and mode — {res.device_name}, {_res(o)}\n")
    lines.append(_fmt_df(pd.DataFrame(rows)))
    timer = next((r.report.timer for r in res.rows if r.report), "-")
    lines.append(f"\nLegend. {res.device_name} [{o.device}], {_res(o)}, {_settings(o)}; timer: {timer}; one call = "
                 "the whole SR pipeline (OSEDiff: DAPE tag path at 384 px + CLIP text encode + VAE encode + UNet "
                 "+ decode, LoRA merged; AdcSR: unshuffle + UNet + half-decoder + colour match); half precision = "
                 "weights and input cast (as a deployment would), not autocast; peak memory: "
                 "torch.cuda.max_memory_allocated over one extra call (weights included; CPU: process RSS). "
                 "Finite output: no NaN/inf in the last timed call's SR (random weights; real AdcSR weights are "
                 "reported to overflow in pure fp16: see the README's Deploy section).\n")
    rat = [{"dtype": d, "mode": _mode_title(m), "OSEDiff median (ms)": f"{t:.2f}", "AdcSR median (ms)": f"{a:.2f}",
            "OSEDiff/AdcSR": f"{t / a:.2f}x", "AdcSR latency change": f"{(a / t - 1) * 100:+.1f} %"}
           for (d, m), (t, a) in _ratios(res).items()]
    lines.append(f"\n## OSEDiff/AdcSR, same run — {res.device_name}, {_res(o)}\n")
    lines.append(_fmt_df(pd.DataFrame(rat)) if rat else "_(needs both models)_\n")
    lines.append(f"\nLegend. Ratio of medians per dtype and mode, both models measured in this run on "
                 f"{res.device_name}. Reference: AdcSR paper 0.03 s vs OSEDiff 0.11 s on an A100 (3.7x); "
                 "OSEDiff's own script 0.1046 s (A100, fp16, 512 px, DAPE included).\n")
    return "\n".join(lines)


def tidy_table(res: BenchResult) -> pd.DataFrame:
    o = res.options
    rows = []
    for r in res.rows:
        base = {"model": r.model, "dtype": r.dtype, "mode": r.mode, "device": f"{o.device} ({res.device_name})",
                "resolution": _res(o), "settings": _settings(o), "size": o.size}
        if r.report is None:
            rows.append({**base, "quantity": "skipped", "value": None, "unit": "", "timer": r.skipped})
            continue
        rep = r.report
        for q, v, u in (("latency_median", rep.median_ms, "ms"), ("latency_q1", rep.q1_ms, "ms"),
                        ("latency_q3", rep.q3_ms, "ms"), ("latency_min", rep.min_ms, "ms"),
                        ("latency_max", rep.max_ms, "ms"), ("repeats", rep.repeats, "count"),
                        ("warmup", rep.warmup, "count"), ("peak_memory", rep.peak_memory_bytes, "bytes"),
                        ("finite_output", r.finite, "bool"), ("build_time", round(r.build_s, 2), "s"),
                        ("compile_time", rep.compile_time_s, "s")):
            if v is not None:
                rows.append({**base, "quantity": q, "value": round(v, 4) if isinstance(v, float) else v, "unit": u,
                             "timer": rep.timer})
    for (d, m), (t, a) in _ratios(res).items():
        rows.append({"model": "osediff_over_adcsr", "dtype": d, "mode": m, "device": f"{o.device} ({res.device_name})",
                     "resolution": _res(o), "settings": _settings(o), "size": o.size, "quantity": "latency_ratio",
                     "value": round(t / a, 4), "unit": "x", "timer": "ratio of medians"})
    return pd.DataFrame(rows, dtype=object)  # object: counts stay integers in the CSV


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profiling.gpu_bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--lr-size", type=int, default=128)
    p.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma-separated subset of fp32,bf16,fp16")
    p.add_argument("--modes", default="eager", help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="same as --modes compile (adds minutes)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 matmul/conv")
    p.add_argument("--models", default="osediff,adcsr")
    p.add_argument("--out", default="reports")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="skip the remaining measurements once this many seconds have passed")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = _parser().parse_args(argv)
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    modes = ("compile",) if a.compile else split(a.modes)
    o = GpuBenchOptions(device=a.device, size=a.size, lr_size=a.lr_size, dtypes=split(a.dtypes), warmup=a.warmup,
                        repeats=a.repeats, modes=modes, channels_last=a.channels_last, tf32=a.tf32,
                        models=split(a.models), out=a.out, budget_s=a.budget_s, threads=a.threads)
    command = "python -m profiling.gpu_bench" + (" " + shlex.join(argv) if argv else "")
    out = Path(o.out)
    md, csv = out / "gpu-latency.md", out / "gpu-latency.csv"

    def write(res: BenchResult) -> None:
        atomic_write_text(md, render_markdown(res))
        atomic_write_text(csv, tidy_table(res).to_csv(index=False))

    def body() -> int:
        res = run_bench(o, command, log=lambda s: print(s, file=sys.stderr, flush=True), on_row=write)
        write(res)
        print(f"wrote {md}, {csv} in {res.seconds:.0f} s")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
