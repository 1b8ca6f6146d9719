"""Score a folder of SR outputs against a folder of HR references.

    python -m compress.evaluate --sr results/ --hr data/samples/realsr/HR [--out DIR] [--metrics psnr,ssim,lpips]

Why: the students must be compared with the published one-step SR models on the numbers their papers print, so
images are paired the way their scripts pair them (sorted file names, names may differ),
PSNR/SSIM match pyiqa's Y-channel versions, and learned metrics use pyiqa itself, offline,
only when it is installed with its weights on disk (otherwise they are listed as unavailable).
Writes ``per_image.csv``, ``summary.csv`` and ``summary.md`` atomically into ``--out``
(default: ``<sr>_metrics`` beside the SR folder, so the input folder is left untouched).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from PIL import Image, UnidentifiedImageError

from .errors import AdcError
from .metrics.images import list_images
from .metrics.learned import LEARNED_METRICS

if TYPE_CHECKING:
    import pandas as pd

# torch and pandas are imported where needed: bad input is reported before paying for them.

__all__ = [
    "DEFAULT_METRICS",
    "evaluate_folders",
    "main",
    "pair_folders",
    "parse_metric_names",
    "psnr_y",
    "ssim_y",
    "summarize",
    "write_reports",
]

#: The one-step SR papers' table (as AdcSR prints it), in its column order.
DEFAULT_METRICS = ("psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa", "fid")
_BUILTIN = ("psnr", "ssim")
_ALIASES = {"maniqa-pipal": "maniqa", "clip-iqa": "clipiqa", "psnry": "psnr"}
#: Reports are for sharing; the temporary files atomic_path makes are private (0600).
_LOWER_BETTER = {"psnr": False, "ssim": False, **{k: v.lower_better for k, v in LEARNED_METRICS.items()}}


def __getattr__(name: str) -> Any:
    """``psnr_y`` / ``ssim_y`` re-exported lazily for training code (PEP 562)."""
    if name in ("psnr_y", "ssim_y"):
        return getattr(importlib.import_module(".metrics.psnr_ssim", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_metric_names(metrics: str | Iterable[str]) -> list[str]:
    """'psnr,SSIM, lpips' or an iterable -> canonical names, deduplicated, order kept."""
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names: list[str] = []
    for raw in items:
        name = str(raw).strip().lower()
        if not name:
            continue
        name = _ALIASES.get(name, name)
        if name not in _BUILTIN and name not in LEARNED_METRICS:
            raise AdcError(f"unknown metric '{raw}'; choose from {', '.join(DEFAULT_METRICS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise AdcError("no metrics requested")
    return names


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise AdcError(f"{path}: unreadable image ({type(exc).__name__}: {str(exc)[:120]})") from None


def pair_folders(sr_dir: str | os.PathLike, hr_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Pair SR and HR images by sorted file name order; checks counts, readability and sizes up front."""
    sr_files = list_images(sr_dir, "SR")
    hr_files = list_images(hr_dir, "HR")
    if len(sr_files) != len(hr_files):
        raise AdcError(f"image count mismatch: {len(sr_files)} SR images in {sr_dir} "
                       f"vs {len(hr_files)} HR images in {hr_dir}")
    pairs = list(zip(sr_files, hr_files))
    for sr, hr in pairs:
        s, h = _image_size(sr), _image_size(hr)
        if s != h:
            raise AdcError(f"size mismatch: {sr} is {s[0]}x{s[1]} but {hr} is {h[0]}x{h[1]}")
    return pairs


def evaluate_folders(sr_dir: str | os.PathLike, hr_dir: str | os.PathLike,
                     metrics: str | Iterable[str] = DEFAULT_METRICS,
                     device: str | None = None) -> pd.DataFrame:
    """Per-image scores as a DataFrame (columns ``sr``, ``hr``, then one per computed metric).

    ``df.attrs`` carries what a per-image table cannot: ``set_metrics`` (folder-level scores
    such as FID), ``unavailable`` ({metric: reason}), ``metrics`` (requested, in order),
    ``sr_dir``/``hr_dir`` and ``pyiqa`` (its version or None).
    """
    names = parse_metric_names(metrics)
    pairs = pair_folders(sr_dir, hr_dir)

    import pandas as pd

    from .metrics.images import load_image
    from .metrics.learned import open_learned_metrics, pyiqa_version
    from .metrics.psnr_ssim import psnr_y, ssim_y

    learned_names = [n for n in names if n in LEARNED_METRICS]
    learned, unavailable = open_learned_metrics(learned_names, device=device)

    rows = []
    for sr_path, hr_path in pairs:
        sr, hr = load_image(sr_path), load_image(hr_path)
        row: dict[str, object] = {"sr": sr_path.name, "hr": hr_path.name}
        for name in names:  # columns in the order asked for
            if name == "psnr":
                row[name] = float(psnr_y(sr, hr)[0])
            elif name == "ssim":
                row[name] = float(ssim_y(sr, hr)[0])
            elif name in learned and learned[name].spec.kind != "set":
                try:
                    row[name] = learned[name].image(sr, hr)
                except Exception as exc:  # a third-party model failing must not cost the other metrics
                    unavailable[name] = _failure(exc, sr_path.name)
                    del learned[name]
        rows.append(row)

    set_scores = {}
    for name, m in list(learned.items()):
        if m.spec.kind == "set":
            try:
                set_scores[name] = m.folders(Path(sr_dir), Path(hr_dir))
            except Exception as exc:
                unavailable[name] = _failure(exc, "the folders")
    df = pd.DataFrame(rows).drop(columns=[n for n in unavailable], errors="ignore")
    df.attrs.update(
        metrics=names,
        set_metrics=set_scores,
        unavailable=unavailable,
        sr_dir=str(sr_dir),
        hr_dir=str(hr_dir),
        pyiqa=pyiqa_version() if learned_names else None,
    )
    return df


def _failure(exc: BaseException, where: str) -> str:
    msg = " ".join(str(exc).split())[:160] or type(exc).__name__
    return f"failed on {where} ({type(exc).__name__}: {msg})"


def summarize(per_image: pd.DataFrame) -> pd.DataFrame:
    """One row per requested metric: ``metric``, ``value`` (mean, or the folder score), ``n_images``,
    ``lower_better``, ``status`` ('ok' or 'unavailable (...)')."""
    import pandas as pd

    names = per_image.attrs.get("metrics") or [c for c in per_image.columns if c not in ("sr", "hr")]
    set_scores = per_image.attrs.get("set_metrics", {})
    unavailable = per_image.attrs.get("unavailable", {})
    n = len(per_image)
    rows = []
    for name in names:
        if name in per_image.columns:
            value, status = float(per_image[name].mean()), "ok"
        elif name in set_scores:
            value, status = float(set_scores[name]), "ok"
        else:
            value, status = float("nan"), unavailable.get(name, "unavailable")
        rows.append({"metric": name, "value": value, "n_images": n,
                     "lower_better": _LOWER_BETTER.get(name, False), "status": status})
    return pd.DataFrame(rows, columns=["metric", "value", "n_images", "lower_better", "status"])


def _markdown(per_image: pd.DataFrame, summary: pd.DataFrame) -> str:
    import pandas as pd

    a = per_image.attrs
    lines = [
        "# SR evaluation",
        "",
        f"- SR: `{a.get('sr_dir', '?')}`",
        f"- HR: `{a.get('hr_dir', '?')}`",
        f"- images: {len(per_image)} (paired by sorted file name)",
        "- PSNR/SSIM: Y channel (BT.601 ycbcr), no border crop, as pyiqa `test_y_channel=True, color_space='ycbcr'`",
    ]
    if a.get("pyiqa"):
        lines.append(f"- learned metrics: pyiqa {a['pyiqa']}")
    lines += ["", "| metric | value | better | status |", "|---|---:|---|---|"]
    for r in summary.itertuples(index=False):
        value = "-" if pd.isna(r.value) else f"{r.value:.4f}"
        better = "lower" if r.lower_better else "higher"
        lines.append(f"| {r.metric.upper()} | {value} | {better} | {r.status} |")
    return "\n".join(lines) + "\n"


def write_reports(per_image: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write per_image.csv, summary.csv and summary.md into ``out_dir``, each atomically."""
    from .io import atomic_path

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AdcError(f"--out is not a folder: {out}")
    summary = summarize(per_image)
    paths = {"per_image": out / "per_image.csv", "summary": out / "summary.csv", "markdown": out / "summary.md"}
    try:
        with atomic_path(paths["per_image"]) as tmp:
            per_image.to_csv(tmp, index=False, float_format="%.6f")
        with atomic_path(paths["summary"]) as tmp:
            summary.to_csv(tmp, index=False, float_format="%.6f")
        with atomic_path(paths["markdown"]) as tmp:
            tmp.write_text(_markdown(per_image, summary), encoding="utf-8")
    except OSError as exc:
        raise AdcError(f"cannot write reports to {out}: {exc.strerror or exc}") from None
    return paths


def _default_out(sr_dir: str) -> Path:
    sr = Path(sr_dir).resolve()
    return sr.with_name(sr.name + "_metrics")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compress.evaluate",
        description="Score SR images against HR references (pairs by sorted file name).")
    parser.add_argument("--sr", required=True, help="folder of super-resolved images")
    parser.add_argument("--hr", required=True, help="folder of ground-truth images (same count and sizes)")
    parser.add_argument("--out", default=None, help="report folder (default: <sr>_metrics beside the SR folder)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help=f"comma-separated, from {','.join(DEFAULT_METRICS)} (default: all)")
    parser.add_argument("--device", default=None, help="device for learned metrics (default: cuda if available)")
    args = parser.parse_args(argv)
    try:
        df = evaluate_folders(args.sr, args.hr, metrics=args.metrics, device=args.device)
        out = Path(args.out) if args.out else _default_out(args.sr)
        paths = write_reports(df, out)
    except AdcError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.write(paths["markdown"].read_text(encoding="utf-8"))
    print(f"wrote {paths['per_image']}, {paths['summary']}, {paths['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
