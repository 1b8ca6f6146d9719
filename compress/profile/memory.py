"""Peak memory of one block of work (a stage, a training loop), as its own numbers.

Why not the process's max RSS (``ru_maxrss``): it is the lifetime peak (a stage reports what an
earlier one used) and it counts file pages mapped from safetensors, which the kernel can drop.
Here a thread samples the process's *anonymous* memory (``RssAnon``: what the block really
holds) and its RSS while the block runs, and the report gives the peak and the rise over the
level at entry; on a GPU, ``torch.cuda.max_memory_allocated`` after a reset.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

MIB = 2**20


def _status() -> dict[str, int]:
    """RssAnon and VmRSS of this process in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("RssAnon", "VmRSS"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


@contextlib.contextmanager
def sampled_peaks(read: Callable[[], dict[str, int]], interval_s: float) -> Iterator[dict[str, int]]:
    """Peaks of ``read()``'s values while the block runs: a thread samples every ``interval_s`` and
    once more at exit; the yielded dict is filled in as it goes (final on exit)."""
    peak = dict(read())
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            for k, v in read().items():
                peak[k] = max(peak.get(k, 0), v)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        yield peak
    finally:
        stop.set()
        th.join()
        for k, v in read().items():
            peak[k] = max(peak.get(k, 0), v)


@dataclass
class BlockMemory:
    """Peaks of one block (MiB). ``anon_rise_mib``: the peak of anonymous memory minus its level at
    entry, i.e. what the block itself added (the models it built, activations, optimiser state)."""

    peak_anon_mib: float = 0.0
    anon_rise_mib: float = 0.0
    peak_rss_mib: float = 0.0
    cuda_max_allocated_mib: float | None = None
    method: str = "RssAnon/VmRSS of /proc/self/status sampled every 50 ms"

    def to_dict(self) -> dict[str, float | str | None]:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@contextlib.contextmanager
def track_memory(device: torch.device | str | None = None, interval_s: float = 0.05) -> Iterator[BlockMemory]:
    """Measure the block's memory; the yielded :class:`BlockMemory` is filled in on exit."""
    res = BlockMemory()
    start = _status()
    cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with sampled_peaks(_status, interval_s) as peak:
        yield res
    res.peak_anon_mib = peak.get("RssAnon", 0) / MIB
    res.anon_rise_mib = max(0, peak.get("RssAnon", 0) - start.get("RssAnon", 0)) / MIB
    res.peak_rss_mib = peak.get("VmRSS", 0) / MIB
    if cuda:
        res.cuda_max_allocated_mib = torch.cuda.max_memory_allocated(device) / MIB


__all__ = ["track_memory", "BlockMemory", "sampled_peaks"]
