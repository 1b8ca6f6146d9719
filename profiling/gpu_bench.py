"""OSEDiff vs AdcSR latency on one GPU at LR 128 -> SR 512, in one run -> reports/gpu-latency.{md,csv}.

    python -m profiling.gpu_bench [--device cuda] [--size full|tiny] [--lr-size 128]
        [--dtypes fp16,bf16,fp32] [--warmup 10] [--repeats 30] [--compile] [--channels-last] [--tf32]
        [--models osediff,adcsr] [--out reports] [--budget-s 240] [--threads 0]

Meant to be started by ``profiling/gpu_bench.sh`` on a CUDA machine; ``--size tiny --device cpu``
is a dry run of the same code (tests use it). Why this protocol: random-init full-size models
(latency does not depend on the weights' values, and no checkpoint is needed), the same pipeline
that :mod:`profiling.compare` counts (OSEDiff: DAPE tag path + text encode + VAE encode + UNet +
decode, LoRA merged as OSEDiff times it; AdcSR: its whole forward), every dtype of a model
measured back to back on the same GPU so the OSEDiff/AdcSR ratio of each dtype comes from one run.
Each call is bracketed by CUDA events and synchronised (:func:`compress.profile.latency.measure_latency`):
median and IQR over ``--repeats`` calls after ``--warmup`` calls; peak memory from one extra call.
Half-precision weights are cast from the fp32 init (fp32 is measured first).
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
from typing import Any

import pandas as pd
import torch

from compress.errors import AdcError
from compress.io import atomic_write_text
from profiling.compare import SPECS, _env, _fmt_df, _num_threads, pipeline_calls
from compress.profile.latency import LatencyReport, device_name, measure_latency

__all__ = ["GpuBenchOptions", "BenchRow", "run_bench", "render_markdown", "tidy_table", "main"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ORDER = ("fp32", "bf16", "fp16")  # fp32 first: half copies are cast from the fp32 init


@dataclass
class GpuBenchOptions:
    device: str = "cuda"
    size: str = "full"
    lr_size: int = 128
    dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32")
    warmup: int = 10
    repeats: int = 30
    compile: bool = False
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
    """One (model, dtype) measurement, or why it was skipped."""

    model: str
    dtype: str
    report: LatencyReport | None
    finite: bool | None
    build_s: float
    skipped: str = ""


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


def _bench_model(name: str, o: GpuBenchOptions, deadline: float, log) -> list[BenchRow]:
    from compress.zoo import build
    from compress.zoo.lora import merge_and_unload

    spec = SPECS[name]
    dtypes = [d for d in _ORDER if d in o.dtypes]
    if time.perf_counter() > deadline:
        return [BenchRow(name, d, None, None, 0.0, "time budget spent before this model") for d in dtypes]
    t0 = time.perf_counter()
    model = build(name, o.size, o.device)
    if spec.mergeable_lora:
        merge_and_unload(model)
    build_s = time.perf_counter() - t0
    log(f"{name}: built on {o.device} in {build_s:.0f} s")
    rows = []
    lr32 = torch.rand(1, 3, o.lr_size, o.lr_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    try:
        for d in dtypes:
            if time.perf_counter() > deadline:
                rows.append(BenchRow(name, d, None, None, build_s, f"--budget-s {o.budget_s:g} spent"))
                continue
            lr = lr32.to(device=o.device, dtype=_DTYPES[d])  # measure_latency casts the module, not the closure
            calls = pipeline_calls(spec, model, lr)
            last: list[Any] = [None]

            def run() -> Any:
                out = None
                for _, fn, args in calls:
                    out = fn(*args)
                last[0] = out  # kept, not checked: a check would synchronise inside the timed call
                return out

            try:
                rep = measure_latency(run, device=o.device, module=model, dtype=d, warmup=o.warmup,
                                      repeats=o.repeats, channels_last=o.channels_last, compile=o.compile)
            except (RuntimeError, NotImplementedError) as exc:  # an op without a kernel for this dtype, OOM
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                log(f"{name} {d}: failed: {first}")
                rows.append(BenchRow(name, d, None, None, build_s, f"failed: {type(exc).__name__}: {first}"))
                continue
            finite = bool(torch.isfinite(last[0]).all().item()) if isinstance(last[0], torch.Tensor) else None
            log(f"{name} {d}: median {rep.median_ms:.2f} ms (IQR {rep.q1_ms:.2f}-{rep.q3_ms:.2f}), finite={finite}")
            rows.append(BenchRow(name, d, rep, finite, build_s))
    finally:
        del model
        gc.collect()
        if torch.device(o.device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_bench(o: GpuBenchOptions, command: str, log=lambda s: None) -> BenchResult:
    o.check()
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    deadline = t0 + o.budget_s
    rows: list[BenchRow] = []
    with _num_threads(o.threads), _tf32(o.tf32):
        for name in o.models:
            rows += _bench_model(name, o, deadline, log)
        name_ = device_name(o.device)
    res = BenchResult(o, rows, command, started, name_, env=_env())
    res.seconds = time.perf_counter() - t0
    return res


def _res(o: GpuBenchOptions) -> str:
    return f"LR {o.lr_size}x{o.lr_size} -> SR {4 * o.lr_size}x{4 * o.lr_size}, batch 1"


def _settings(o: GpuBenchOptions) -> str:
    return (f"{'torch.compile' if o.compile else 'eager'}, {'channels_last' if o.channels_last else 'contiguous'}, "
            f"TF32 {'on' if o.tf32 else 'torch default'}")


def _ratios(res: BenchResult) -> dict[str, tuple[float, float]]:
    """dtype -> (OSEDiff median ms, AdcSR median ms), for dtypes where both were measured."""
    by = {(r.model, r.dtype): r.report for r in res.rows if r.report is not None}
    return {d: (by[("osediff", d)].median_ms, by[("adcsr", d)].median_ms)
            for d in _ORDER if ("osediff", d) in by and ("adcsr", d) in by}


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
    rows = []
    for r in res.rows:
        if r.report is None:
            rows.append({"model": SPECS[r.model].title, "dtype": r.dtype, "median (ms)": "-", "IQR (ms)": "-",
                         "min (ms)": "-", "peak memory (GiB)": "-", "finite output": "-", "note": r.skipped})
            continue
        rep = r.report
        note = f"{rep.repeats} calls after {rep.warmup} warm-up"
        if rep.compiled and rep.compile_time_s is not None:
            note += f"; compile + first call {rep.compile_time_s:.1f} s"
        rows.append({"model": SPECS[r.model].title, "dtype": r.dtype, "median (ms)": f"{rep.median_ms:.2f}",
                     "IQR (ms)": f"{rep.q1_ms:.2f}-{rep.q3_ms:.2f}", "min (ms)": f"{rep.min_ms:.2f}",
                     "peak memory (GiB)": f"{rep.peak_memory_bytes / 2**30:.2f}" if rep.peak_memory_bytes else "-",
                     "finite output": str(r.finite), "note": note})
    lines.append(f"## Latency per model and dtype — {res.device_name}, {_res(o)}\n")
    lines.append(_fmt_df(pd.DataFrame(rows)))
    timer = next((r.report.timer for r in res.rows if r.report), "-")
    lines.append(f"\nLegend. {res.device_name} [{o.device}], {_res(o)}, {_settings(o)}; timer: {timer}; one call = "
                 "the whole SR pipeline (OSEDiff: DAPE tag path at 384 px + CLIP text encode + VAE encode + UNet "
                 "+ decode, LoRA merged; AdcSR: unshuffle + UNet + half-decoder + colour match); peak memory: "
                 "torch.cuda.max_memory_allocated over one extra call (weights included; CPU: process RSS). "
                 "Finite output: no NaN/inf in the last timed call's SR (random weights; real AdcSR weights are "
                 "reported to overflow in pure fp16).\n")
    rat = [{"dtype": d, "OSEDiff median (ms)": f"{t:.2f}", "AdcSR median (ms)": f"{a:.2f}",
            "OSEDiff/AdcSR": f"{t / a:.2f}x", "AdcSR latency change": f"{(a / t - 1) * 100:+.1f} %"}
           for d, (t, a) in _ratios(res).items()]
    lines.append(f"\n## OSEDiff/AdcSR, same run — {res.device_name}, {_res(o)}\n")
    lines.append(_fmt_df(pd.DataFrame(rat)) if rat else "_(needs both models)_\n")
    lines.append(f"\nLegend. Ratio of medians per dtype, both models measured in this run on {res.device_name}. "
                 "Reference: AdcSR paper 0.03 s vs OSEDiff 0.11 s on an A100 (3.7x); OSEDiff's own script "
                 "0.1046 s (A100, fp16, 512 px, DAPE included).\n")
    return "\n".join(lines)


def tidy_table(res: BenchResult) -> pd.DataFrame:
    o = res.options
    rows = []
    for r in res.rows:
        base = {"model": r.model, "dtype": r.dtype, "device": f"{o.device} ({res.device_name})",
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
    for d, (t, a) in _ratios(res).items():
        rows.append({"model": "osediff_over_adcsr", "dtype": d, "device": f"{o.device} ({res.device_name})",
                     "resolution": _res(o), "settings": _settings(o), "size": o.size, "quantity": "latency_ratio",
                     "value": round(t / a, 4), "unit": "x", "timer": "ratio of medians"})
    return pd.DataFrame(rows, dtype=object)  # object: counts stay integers in the CSV


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profiling.gpu_bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--lr-size", type=int, default=128)
    p.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma-separated subset of fp32,bf16,fp16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="torch.compile the pipeline (adds minutes)")
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
    o = GpuBenchOptions(device=a.device, size=a.size, lr_size=a.lr_size, dtypes=split(a.dtypes), warmup=a.warmup,
                        repeats=a.repeats, compile=a.compile, channels_last=a.channels_last, tf32=a.tf32,
                        models=split(a.models), out=a.out, budget_s=a.budget_s, threads=a.threads)
    command = "python -m profiling.gpu_bench" + (" " + shlex.join(argv) if argv else "")
    try:
        res = run_bench(o, command, log=lambda s: print(s, file=sys.stderr, flush=True))
        out = Path(o.out)
        md = atomic_write_text(out / "gpu-latency.md", render_markdown(res))
        csv = atomic_write_text(out / "gpu-latency.csv", tidy_table(res).to_csv(index=False))
    except AdcError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {md}, {csv} in {res.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
