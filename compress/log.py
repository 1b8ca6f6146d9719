"""Logging and progress, as the field's tools do it.

Every module logs through ``logging.getLogger("adc.<module>")``; :func:`setup_logging` (called by
the CLIs) prints them on stderr with a timestamp, and, for a run, also writes a ``run.log`` in its
run directory with the level and the logger's name. :func:`progress` shows a tqdm bar on a
terminal and, when the output goes to a file or a pipe, a log line every ``every_s`` seconds
instead (a bar redrawn with ``\\r`` turns a 5-minute log into 50 KB of noise).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

ROOT = "adc"
T = TypeVar("T")
_FILE_HANDLER: logging.Handler | None = None


def get_logger(name: str) -> logging.Logger:
    """The logger of an adc module (``compress.stages.evaluate`` -> ``adc.stages.evaluate``)."""
    if name == "__main__":  # python -m compress.run: name it after the module, not the entry point
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None else "main"
    short = name.removeprefix("compress.").removeprefix("profiling.")
    return logging.getLogger(f"{ROOT}.{short}")


def setup_logging(level: int | str = logging.INFO, stream=None) -> logging.Logger:
    """Console logging for adc's loggers (idempotent): ``HH:MM:SS message`` on stderr."""
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    if not any(getattr(h, "_adc_console", False) for h in root.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._adc_console = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False
    return root


def log_to_file(path: Path | None) -> None:
    """Also write every adc log record to ``path`` (``None``: stop): level, logger and full timestamp."""
    global _FILE_HANDLER
    root = logging.getLogger(ROOT)
    if _FILE_HANDLER is not None:
        root.removeHandler(_FILE_HANDLER)
        _FILE_HANDLER.close()
        _FILE_HANDLER = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        _FILE_HANDLER = handler


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(iterable: Iterable[T], desc: str, total: int | None = None, logger: logging.Logger | None = None,
             every_s: float = 30.0, disable: bool = False) -> Iterator[T]:
    """Iterate with a tqdm bar on a terminal, else a log line every ``every_s`` seconds (and at the end)."""
    if disable:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if is_terminal():
        from tqdm import tqdm

        yield from tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True)
        return
    log = logger or get_logger("progress")
    start = last = time.perf_counter()
    n = 0
    for item in iterable:
        yield item
        n += 1
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            log.info(f"{desc}: {n}{of} ({now - start:.0f} s)")
    if n:
        log.info(f"{desc}: {n}{'/' + str(total) if total else ''} done in {time.perf_counter() - start:.1f} s")


__all__ = ["get_logger", "setup_logging", "log_to_file", "progress", "is_terminal"]
