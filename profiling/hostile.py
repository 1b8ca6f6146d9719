"""What every hostile-input section of ``profiling/bench_reliability.py`` shares: running a command
like a user (a subprocess), reading its outcome, and one markdown row per case.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "realsr"
# A structure-only run (the student's records on meta, no weights), in seconds
STUDENT_RUN = """
name: structure
device: meta          # a structure-only run: the student's records, no weights (seconds)
models: {family: osediff, size: tiny}
task: {lr_size: 32}
stages:
  - remove: {init: teacher}
"""
TINY = ["--model", "adcsr", "--size", "tiny", "--device", "cpu"]


@dataclass
class Context:
    work: Path
    lr: tuple[int, int] = (4000, 3000)
    model_tiles: int = 6
    tile: int = 256
    batches: tuple[int, ...] = (1, 4)
    log: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)


def _env(single_thread: bool = True) -> dict[str, str]:
    env = dict(os.environ, PYTHONWARNINGS="default")
    if single_thread:  # many small runs on shared cores
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@dataclass
class Outcome:
    rc: int
    line: str
    traceback: bool
    seconds: float
    model_loaded: bool = False


_WORK = [""]  # the scratch folder, shown as $WORK in the report


def run_cli(module: str, args: list[str], timeout: int = 600) -> Outcome:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=_env(), timeout=timeout)
    return _outcome(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


def _outcome(rc: int, out: str, err: str, seconds: float) -> Outcome:
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", ln) for ln in (err + "\n" + out).splitlines() if ln.strip()]  # log time
    keys = ("error:", "interrupted", "skipped:", "warning:", "notice:", "done:")
    picked = [ln for ln in lines if ln.startswith(keys) and "random weights" not in ln]
    line = " / ".join(picked[:2]) if picked else (lines[-1] if lines else "")
    if _WORK[0]:
        line = line.replace(_WORK[0], "$WORK")
    line = line.replace(str(REPO), "$REPO")  # no machine paths in the report
    line = re.sub(r"(done: .*skipped), [0-9.]+ s ->", r"\1, ... s ->", line)
    return Outcome(rc, line, "Traceback" in err, seconds, "random weights" in err)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(case: str, tried: str, o: Outcome, expected_rc: int, extra_ok: bool = True, note: str = "") -> str:
    ok = o.rc == expected_rc and not o.traceback and extra_ok
    verdict = "ok" if ok else "**NOT OK**"
    return (f"| {case} | {_md(tried)} | {o.rc} | `{_md(o.line)[:300]}` | {verdict}{'; ' + note if note else ''} |")


def _table(rows: list[str]) -> str:
    head = "| input class | tried | exit | the line printed | outcome |\n|---|---|---|---|---|\n"
    return head + "\n".join(rows) + "\n"


def _noise_png(path: Path, w: int, h: int, mode: str = "RGB", seed: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


@contextlib.contextmanager
def tmpfs(where: Path, size: str, readonly: bool = False):
    """A small tmpfs at ``where`` (yields True), or yields False where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", str(where)], check=False)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _bomb_png(path: Path, w: int, h: int) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * (1 + 3 * w) * 4)  # 4 rows of data, the rest missing
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- crafted model files


class _WritesMarker:
    """Unpickling this object creates ``path``: proof that a model file ran code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil(marker: Path) -> bytes:
    return pickle.dumps(_WritesMarker(marker), protocol=2)


def rezip(src: Path, dst: Path, change) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info.filename)))
    return dst


def pt2_with_pickled_weight(src: Path, dst: Path, marker: Path) -> Path:
    """``src`` with its first weight marked ``use_pickle`` and replaced by a pickle that creates ``marker``."""
    state: dict[str, str] = {}

    def mark(name: str, data: bytes) -> bytes:
        if name.endswith("data/weights/model_weights_config.json"):
            cfg = json.loads(data)
            fqn = next(iter(cfg["config"]))
            cfg["config"][fqn]["use_pickle"] = True
            state["file"] = cfg["config"][fqn]["path_name"]
            return json.dumps(cfg).encode()
        return data

    staged = rezip(src, dst.with_name(dst.name + ".staged"), mark)
    rezip(staged, dst, lambda n, d: _evil(marker) if n.endswith(f"data/weights/{state['file']}") else d)
    staged.unlink()
    return dst


def pt2_with_pickled_inputs(src: Path, dst: Path, marker: Path) -> Path:
    """``src`` whose sample inputs are a pickle that creates ``marker`` (torch retries them unsafely)."""
    return rezip(src, dst, lambda n, d: _evil(marker) if n.endswith("data/sample_inputs/model.pt") else d)
