"""Latency and peak-memory measurement of one model call.

Protocol (reference notes, section 5): ``eval()`` + ``torch.inference_mode()``, warm-up calls
first (they also absorb cuDNN autotuning and lazy init), ``torch.compile`` time measured on its
own first call and kept out of the timings, then ``repeats`` timed calls. On CUDA each call is
bracketed by CUDA events and followed by ``torch.cuda.synchronize`` (so a call starts from an
idle GPU: latency, not pipelined throughput); on CPU ``time.perf_counter``. Report median and
IQR; means are pulled by scheduler noise on shared machines.

Peak memory comes from one extra, untimed call after warm-up, so measuring it never perturbs
the timings: CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats``; CPU the process
RSS high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), or psutil RSS sampled
from a thread where that reset is refused. ``tracemalloc`` is not used: it only sees Python's
allocator, not torch's C++ tensor memory.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import AdcError

__all__ = ["LatencyReport", "PeakMemory", "measure_latency", "peak_memory", "device_name"]

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _DTYPES.values():
            raise AdcError(f"measure_latency: dtype={dtype}, expected one of fp32, bf16, fp16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise AdcError(f"measure_latency: dtype={dtype!r}, expected one of fp32, bf16, fp16")


def _parse_device(device: str | torch.device, who: str = "measure_latency") -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AdcError(f"{who}: device={device!r}, expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise AdcError(f"{who}: device={device!r}, expected 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AdcError(f"{who}: device={device!r} but torch {torch.__version__} sees no CUDA GPU")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str | torch.device) -> str:
    """Human-readable device: the GPU model, or the CPU model with torch's thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{_cpu_model()} ({torch.get_num_threads()} torch threads, {os.cpu_count()} logical CPUs)"


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


@dataclass
class PeakMemory:
    """Peak memory of the code run inside :func:`peak_memory`; filled in on exit.

    ``peak_bytes``: CUDA peak allocated / CPU peak RSS, absolute (weights included).
    ``delta_bytes``: ``peak_bytes`` minus the level at entry: what the block added on top.
    On CPU the allocator may reuse memory it kept from earlier calls, so ``delta_bytes`` is a
    lower bound on the block's working set, and RSS is process-wide (other threads count).
    """

    device: str
    method: str = ""
    start_bytes: int = 0
    peak_bytes: int = 0
    delta_bytes: int = 0


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm = _vm_hwm()
    return hwm is not None and hwm <= _rss() + (1 << 20)


@contextlib.contextmanager
def peak_memory(device: str | torch.device = "cpu", sample_interval_s: float = 0.002):
    """Context manager measuring peak memory of its block; yields a :class:`PeakMemory`.

    CUDA: ``reset_peak_memory_stats`` then ``max_memory_allocated`` (the caching allocator's
    view: reserved-but-free cache is not counted). CPU: kernel RSS high-water mark where it
    can be reset, else psutil RSS sampled every ``sample_interval_s`` (can miss short spikes).
    """
    dev = _parse_device(device, "peak_memory")
    res = PeakMemory(device=str(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        res.start_bytes = torch.cuda.memory_allocated(dev)
        res.method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        try:
            yield res
        finally:
            torch.cuda.synchronize(dev)
            res.peak_bytes = torch.cuda.max_memory_allocated(dev)
            res.delta_bytes = res.peak_bytes - res.start_bytes
        return

    res.start_bytes = _rss()
    if _reset_hwm():
        res.method = "process RSS high-water mark (VmHWM, reset via /proc/self/clear_refs)"
        try:
            yield res
        finally:
            res.peak_bytes = max(_vm_hwm() or 0, _rss())
            res.delta_bytes = max(0, res.peak_bytes - res.start_bytes)
        return

    res.method = f"process RSS sampled by psutil every {sample_interval_s * 1e3:g} ms"
    from .memory import sampled_peaks

    try:
        with sampled_peaks(lambda: {"rss": _rss()}, sample_interval_s) as peak:
            yield res
    finally:
        res.peak_bytes = peak["rss"]
        res.delta_bytes = max(0, res.peak_bytes - res.start_bytes)


# ---------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------


@dataclass
class LatencyReport:
    """Timings (ms) of ``repeats`` calls after ``warmup`` calls, with everything that shaped them.

    Compare two reports only when ``device_name``, ``dtype``, ``torch_version`` and the
    settings match. ``compile_time_s`` is the first compiled call (compile + one run), excluded
    from ``times_ms``.
    """

    times_ms: list[float]
    median_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    q1_ms: float
    q3_ms: float
    iqr_ms: float
    warmup: int
    repeats: int
    device: str
    device_name: str
    timer: str
    dtype: str | None
    autocast: bool
    channels_last: bool
    compiled: bool
    compile_kwargs: dict[str, Any]
    compile_time_s: float | None
    peak_memory_bytes: int | None
    peak_memory_delta_bytes: int | None
    peak_memory_method: str | None
    torch_version: str
    cuda_version: str | None
    num_threads: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        mem = (
            f"peak {self.peak_memory_bytes / 2**20:.1f} MiB (+{self.peak_memory_delta_bytes / 2**20:.1f} MiB)"
            if self.peak_memory_bytes is not None
            else "peak memory not measured"
        )
        comp = f", compiled {self.compile_kwargs or ''} (first call {self.compile_time_s:.1f} s)" if self.compiled else ""
        return (
            f"{self.median_ms:.3f} ms median (IQR {self.q1_ms:.3f}-{self.q3_ms:.3f}, min {self.min_ms:.3f}, "
            f"max {self.max_ms:.3f}, mean {self.mean_ms:.3f}) over {self.repeats} calls after {self.warmup} warm-up\n"
            f"{self.device_name} [{self.device}], {self.timer}, dtype={self.dtype}"
            f"{' autocast' if self.autocast else ''}{', channels_last' if self.channels_last else ''}{comp}, "
            f"torch {self.torch_version}\n{mem}"
        )


def _stats(times: list[float]) -> dict[str, float]:
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
        std = statistics.stdev(times)
    else:
        q1 = q3 = times[0]
        std = 0.0
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "std_ms": std,
        "min_ms": min(times),
        "max_ms": max(times),
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
    }


def _prepare_inputs(x: Any, device: torch.device, dtype: torch.dtype | None, channels_last: bool) -> Any:
    def conv(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    return pytree.tree_map(conv, x)


def measure_latency(
    fn: Callable,
    *,
    device: str | torch.device,
    args: tuple = (),
    kwargs: dict | None = None,
    module: nn.Module | None = None,
    warmup: int = 10,
    repeats: int = 50,
    dtype: str | torch.dtype | None = None,
    autocast: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    compile_kwargs: dict | None = None,
    measure_memory: bool = True,
) -> LatencyReport:
    """Time ``fn(*args, **kwargs)`` on ``device``; returns a :class:`LatencyReport`.

    ``module`` (default: ``fn`` itself when it is a module) is put in ``eval()`` and moved to
    ``device`` **in place**, like ``Module.to``; tensor ``args``/``kwargs`` are moved too.
    ``dtype`` casts module and floating inputs (fp32/bf16/fp16); with ``autocast=True`` they
    stay fp32 and the call runs under ``torch.autocast(dtype)`` instead. ``channels_last``
    converts the module and 4-D inputs. ``compile`` wraps ``fn`` in ``torch.compile(**
    compile_kwargs)``; its first call is timed separately as ``compile_time_s``.
    """
    dev = _parse_device(device)
    dt = _parse_dtype(dtype)
    if not isinstance(warmup, int) or warmup < 0:
        raise AdcError(f"measure_latency: warmup={warmup!r}, expected an int >= 0")
    if not isinstance(repeats, int) or repeats < 1:
        raise AdcError(f"measure_latency: repeats={repeats!r}, expected an int >= 1")
    if autocast and dt is None:
        raise AdcError("measure_latency: autocast=True needs dtype (bf16 or fp16)")
    if not callable(fn):
        raise AdcError(f"measure_latency: fn is {type(fn).__name__}, expected a callable or module")
    if compile and not hasattr(torch, "compile"):
        raise AdcError(f"measure_latency: compile=True but torch {torch.__version__} has no torch.compile")
    kwargs = dict(kwargs or {})
    compile_kwargs = dict(compile_kwargs or {})
    if module is None and isinstance(fn, nn.Module):
        module = fn

    if module is not None:
        module.eval()
        module.to(dev)
        if dt is not None and not autocast:
            module.to(dt)
        if channels_last:
            module.to(memory_format=torch.channels_last)
    in_dtype = None if autocast else dt
    args = _prepare_inputs(tuple(args), dev, in_dtype, channels_last)
    kwargs = _prepare_inputs(kwargs, dev, in_dtype, channels_last)

    call = fn
    compile_time = None
    if compile:
        call = torch.compile(fn, **compile_kwargs)

    amp = (lambda: torch.autocast(dev.type, dtype=dt)) if autocast else contextlib.nullcontext
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    with torch.inference_mode(), (torch.cuda.device(dev) if cuda else contextlib.nullcontext()):
        if compile:
            sync()
            t0 = time.perf_counter()
            with amp():
                call(*args, **kwargs)
            sync()
            compile_time = time.perf_counter() - t0
        for _ in range(warmup):
            with amp():
                call(*args, **kwargs)
        sync()

        mem = None
        if measure_memory:
            with peak_memory(dev) as mem, amp():
                call(*args, **kwargs)

        times: list[float] = []
        if cuda:
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                with amp():
                    call(*args, **kwargs)
                end.record()
                torch.cuda.synchronize(dev)
                times.append(start.elapsed_time(end))
            timer = "CUDA events per call, synchronised after each"
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                with amp():
                    call(*args, **kwargs)
                times.append((time.perf_counter() - t0) * 1e3)
            timer = "time.perf_counter per call"

    extra: dict[str, Any] = {}
    if cuda:
        extra["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        extra["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        extra["cudnn_version"] = torch.backends.cudnn.version()
    return LatencyReport(
        times_ms=times,
        **_stats(times),
        warmup=warmup,
        repeats=repeats,
        device=str(dev),
        device_name=device_name(dev),
        timer=timer,
        dtype=None if dt is None else str(dt).replace("torch.", ""),
        autocast=autocast,
        channels_last=channels_last,
        compiled=compile,
        compile_kwargs=compile_kwargs,
        compile_time_s=compile_time,
        peak_memory_bytes=None if mem is None else mem.peak_bytes,
        peak_memory_delta_bytes=None if mem is None else mem.delta_bytes,
        peak_memory_method=None if mem is None else mem.method,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        num_threads=torch.get_num_threads(),
        extra=extra,
    )
