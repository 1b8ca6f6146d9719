"""Parser for the per-image metric logs written by the pyiqa evaluation script of the
one-step SR repositories (``test_metrics.py``).

Why: those logs are the reference numbers our metrics are checked against.
A line looks like ``... - INFO: results_x/Canon_001_LR4.png | PSNR: 25.793726; SSIM: 0.851268; ... | Runtime: 1.06 sec``
and the means like ``PSNR: 25.1511; SSIM: 0.7341; ... | FID: 123.493817 | FID Runtime: 6.79 sec``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from ..errors import AdcError

_PAIR = re.compile(r"([A-Za-z][A-Za-z0-9_+\-]*)\s*:\s*(-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)")
_IMAGE_LINE = re.compile(r"INFO:\s*(?P<path>\S+\.(?:png|jpe?g|bmp|tiff?|webp))\s*\|(?P<rest>.*)$", re.IGNORECASE)


def _metric_pairs(text: str) -> dict[str, float]:
    out = {}
    for key, value in _PAIR.findall(text):
        k = key.lower()
        if k in ("runtime", "fid runtime") or k.endswith("runtime"):
            continue
        out[k] = float(value)
    return out


def parse_metrics_log(path: str | os.PathLike) -> pd.DataFrame:
    """Per-image rows (``image`` = file name, ``path`` as logged, one column per metric, lower-case).

    The averages line, when present, is returned in ``df.attrs['means']`` (a dict, FID included).
    """
    path = Path(path)
    if not path.is_file():
        raise AdcError(f"{path}: metrics log not found")
    rows: list[dict] = []
    means: dict[str, float] = {}
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        m = _IMAGE_LINE.search(line)
        if m:
            rest = m.group("rest").split("| Runtime")[0]
            row = {"image": Path(m.group("path")).name, "path": m.group("path")}
            row.update(_metric_pairs(rest))
            rows.append(row)
        elif "Average Metrics" in line and i + 1 < len(lines):
            means = _metric_pairs(lines[i + 1])
    if not rows:
        raise AdcError(f"{path}: no per-image metric lines found")
    df = pd.DataFrame(rows)
    df.attrs["means"] = means
    return df
