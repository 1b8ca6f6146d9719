"""Score a folder of SR outputs against a folder of HR references.

    python -m compress.evaluate --sr results/ --hr data/samples/realsr/HR [--out DIR] [--metrics psnr,ssim,lpips]

Why: the students must be compared with the published one-step SR models on the numbers their papers print, so
PSNR/SSIM match pyiqa's Y-channel versions, and learned metrics use pyiqa itself, offline,
only when it is installed with its weights on disk (otherwise they are listed as unavailable).
Writes ``per_image.csv``, ``summary.csv`` and ``summary.md`` atomically into ``--out``
(default: ``<sr>_metrics`` beside the SR folder, so the input folder is left untouched); an
existing file of those names is replaced only if adc wrote it there (the folder's ``.adc-written``),
else refused before any scoring.

Pairing (:func:`pair_images`). The papers' scripts pair by sorted order, which silently scores
the wrong pairs when names do not line up (shuffled names: 13.16 dB instead of 15.20). Here:

1. fewer SR images than HR ones: a subset, scored by name: every SR image needs an HR image of
   the same name (without extension); HR images without an SR namesake are ignored, with one
   ``info:`` line saying how many (also in ``summary.md``); otherwise the counts must be equal;
2. if any SR file name (without extension) equals an HR one, every one must: pairs are by
   name, and the first SR image without a namesake is an error;
3. else, if the names differ only by a fixed prefix/suffix per folder (``0001_out.png`` vs
   ``0001.png``, ``x_SR.png`` vs ``x_HR.png``), pairs are by the remaining part of the name;
4. else pairs are by sorted order, and a warning says so on stderr, in ``summary.md`` and in
   the ``pairing`` column of ``summary.csv``.

If no metric at all could be computed (say ``--metrics lpips`` without pyiqa), the command
says why in one line and exits 2 without writing reports. Learned metrics that cannot run get
one ``info:`` line on how to enable them (the ``iqa`` extra, and where their weights go).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from .errors import AdcError
from .metrics.images import list_images
from .metrics.learned import LEARNED_METRICS
from .log import get_logger

if TYPE_CHECKING:
    import pandas as pd

# torch and pandas are imported where needed: bad input is reported before paying for them.
logger = get_logger(__name__)

__all__ = [
    "DEFAULT_METRICS",
    "computed_metrics",
    "evaluate_folders",
    "main",
    "pair_folders",
    "pair_images",
    "parse_metric_names",
    "report_paths",
    "summarize",
    "write_reports",
]

#: The one-step SR papers' table (as AdcSR prints it), in its column order.
DEFAULT_METRICS = ("psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa", "fid")
_BUILTIN = ("psnr", "ssim")
_ALIASES = {"maniqa-pipal": "maniqa", "clip-iqa": "clipiqa", "psnry": "psnr"}
_LOWER_BETTER = {"psnr": False, "ssim": False, **{k: v.lower_better for k, v in LEARNED_METRICS.items()}}


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
    """(width, height) as the scoring reads it (EXIF-upright); unreadable or oversized: one AdcError line."""
    from .data.images import image_size

    return image_size(path)


def _affix_cores(stems: list[str]) -> tuple[list[str], str, str] | None:
    """The stems without their common prefix and suffix, if that leaves distinct non-empty names."""
    if len(stems) < 2:
        return None
    pre = os.path.commonprefix(stems)
    suf = os.path.commonprefix([t[::-1] for t in stems])[::-1]
    cores = [t[len(pre):len(t) - len(suf)] if len(pre) + len(suf) < len(t) else "" for t in stems]
    if not all(cores) or len(set(cores)) != len(cores):
        return None
    return cores, pre, suf


def pair_images(sr_files: list[Path], hr_files: list[Path]) -> tuple[list[tuple[Path, Path]], str, str | None]:
    """(pairs, rule, warning) by the rule of the module docstring; ``warning`` is None unless
    the pairs are by sorted order only."""
    sr_dir, hr_dir = (files[0].parent if files else "?" for files in (sr_files, hr_files))
    subset = 0 < len(sr_files) < len(hr_files)  # a subset of the HR folder: scored by name
    if len(sr_files) != len(hr_files) and not subset:
        raise AdcError(f"image count mismatch: {len(sr_files)} SR images in {sr_dir} "
                       f"vs {len(hr_files)} HR images in {hr_dir}")
    by_stem = []
    for role, files in (("SR", sr_files), ("HR", hr_files)):
        stems: dict[str, Path] = {}
        for f in files:
            stems.setdefault(f.stem, f)
        by_stem.append(stems)
    sr_stems, hr_stems = by_stem
    if subset and not set(sr_stems) & set(hr_stems):
        raise AdcError(f"{len(sr_files)} SR images in {sr_dir} vs {len(hr_files)} HR images in {hr_dir}, and no SR "
                       f"file name matches an HR one (e.g. {sr_files[0].name}): fewer SR than HR images are "
                       "paired by name only")
    if set(sr_stems) & set(hr_stems):
        for role, files, stems in (("SR", sr_files, sr_stems), ("HR", hr_files, hr_stems)):
            if len(stems) != len(files):
                twin = next(f for f in files if stems[f.stem] != f)
                raise AdcError(f"{twin}: {role} name {twin.stem!r} is used twice ({stems[twin.stem].name}, {twin.name}); "
                               f"images are paired by name")
        missing = next((f for f in sr_files if f.stem not in hr_stems), None)
        if missing is not None:
            matched = len(set(sr_stems) & set(hr_stems))
            raise AdcError(f"{missing}: no HR image named {missing.stem}.* in {hr_dir} ({matched} of {len(sr_files)} "
                           f"names match; when any name matches, SR and HR are paired by name)")
        return [(sr_stems[h.stem], h) for h in hr_files if h.stem in sr_stems], "by file name", None
    sr_c, hr_c = _affix_cores([f.stem for f in sr_files]), _affix_cores([f.stem for f in hr_files])
    if sr_c and hr_c and set(sr_c[0]) == set(hr_c[0]):
        sr_by_core = dict(zip(sr_c[0], sr_files))
        rule = (f"by file name without the fixed parts (SR {sr_c[1]}*{sr_c[2]}, HR {hr_c[1]}*{hr_c[2]})")
        return [(sr_by_core[c], h) for c, h in zip(hr_c[0], hr_files)], rule, None
    pairs = list(zip(sr_files, hr_files))
    warning = (f"warning: no SR file name matches an HR one; paired by sorted order ({pairs[0][0].name} with "
               f"{pairs[0][1].name}, ...); check the pairs in per_image.csv")
    return pairs, "by sorted order (names differ)", warning


def pair_folders(sr_dir: str | os.PathLike, hr_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Pair SR and HR images (:func:`pair_images`); checks counts, names, readability and sizes up front."""
    return _pair_folders(sr_dir, hr_dir)[0]


def _pair_folders(sr_dir: str | os.PathLike, hr_dir: str | os.PathLike
                  ) -> tuple[list[tuple[Path, Path]], str, str | None, str | None]:
    """(pairs, rule, warning, note): ``note`` says how many HR images had no SR namesake (else None)."""
    hr_files = list_images(hr_dir, "HR")
    pairs, rule, warning = pair_images(list_images(sr_dir, "SR"), hr_files)
    for sr, hr in pairs:
        s, h = _image_size(sr), _image_size(hr)
        if s != h:
            raise AdcError(f"size mismatch: {sr} is {s[0]}x{s[1]} but {hr} is {h[0]}x{h[1]}")
    unmatched = len(hr_files) - len(pairs)
    note = (f"info: scoring the {len(pairs)} SR images by name against {hr_dir}; its other {unmatched} HR images "
            "have no SR image of the same name and are ignored") if unmatched else None
    return pairs, rule, warning, note


def evaluate_folders(sr_dir: str | os.PathLike, hr_dir: str | os.PathLike,
                     metrics: str | Iterable[str] = DEFAULT_METRICS,
                     device: str | None = None, log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Per-image scores as a DataFrame (columns ``sr``, ``hr``, then one per computed metric).

    ``df.attrs`` carries what a per-image table cannot: ``set_metrics`` (folder-level scores
    such as FID), ``unavailable`` ({metric: reason}), ``metrics`` (requested, in order),
    ``sr_dir``/``hr_dir``, ``pyiqa`` (its version or None), ``pairing`` (the rule used) and
    ``pairing_warning`` (a line, when the pairs are by sorted order only; also given to ``log``,
    default: this module's logger), ``pairing_note`` (a line, when the SR images are a subset of
    the HR folder: how many HR images were ignored; also given to ``log``), ``alpha_note`` (a line,
    when images have an alpha channel, which is ignored as pyiqa ignores it; also given to ``log``).
    """
    names = parse_metric_names(metrics)
    pairs, pairing, pairing_warning, pairing_note = _pair_folders(sr_dir, hr_dir)
    if pairing_warning:
        (log or logger.warning)(pairing_warning)
    if pairing_note:
        (log or logger.info)(pairing_note)

    import pandas as pd

    from .metrics.images import load_image_alpha
    from .metrics.learned import open_learned_metrics, pyiqa_version
    from .metrics.psnr_ssim import psnr_y, ssim_y

    learned_names = [n for n in names if n in LEARNED_METRICS]
    learned, unavailable = open_learned_metrics(learned_names, device=device)

    from .log import progress

    rows = []
    with_alpha: list[str] = []
    for sr_path, hr_path in progress(pairs, f"scoring {Path(sr_dir).name}", logger=logger):
        (sr, sr_alpha), (hr, hr_alpha) = load_image_alpha(sr_path), load_image_alpha(hr_path)
        with_alpha += [p.name for p, a in ((sr_path, sr_alpha), (hr_path, hr_alpha)) if a]
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

    alpha_note = (f"info: {len(with_alpha)} images have an alpha channel (e.g. {with_alpha[0]}); it is ignored: "
                  "scored on the RGB, not composited, as pyiqa does") if with_alpha else None
    if alpha_note:
        (log or logger.info)(alpha_note)
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
        pairing=pairing,
        pairing_warning=pairing_warning,
        pairing_note=pairing_note,
        alpha_note=alpha_note,
    )
    return df


def computed_metrics(per_image: pd.DataFrame) -> list[str]:
    """The requested metrics that got a value (a per-image column or a folder score)."""
    names = per_image.attrs.get("metrics") or []
    return [n for n in names if n in per_image.columns or n in per_image.attrs.get("set_metrics", {})]


def _failure(exc: BaseException, where: str) -> str:
    msg = " ".join(str(exc).split())[:160] or type(exc).__name__
    return f"failed on {where} ({type(exc).__name__}: {msg})"


def summarize(per_image: pd.DataFrame) -> pd.DataFrame:
    """One row per requested metric: ``metric``, ``value`` (mean, or the folder score), ``n_images``,
    ``lower_better``, ``status`` ('ok' or 'unavailable (...)'), ``pairing`` (how SR met HR)."""
    import pandas as pd

    names = per_image.attrs.get("metrics") or [c for c in per_image.columns if c not in ("sr", "hr")]
    set_scores = per_image.attrs.get("set_metrics", {})
    unavailable = per_image.attrs.get("unavailable", {})
    pairing = per_image.attrs.get("pairing", "?")
    if per_image.attrs.get("pairing_warning"):
        pairing = f"{pairing}: WARNING, check the pairs"
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
                     "lower_better": _LOWER_BETTER.get(name, False), "status": status, "pairing": pairing})
    return pd.DataFrame(rows, columns=["metric", "value", "n_images", "lower_better", "status", "pairing"])


def _markdown(per_image: pd.DataFrame, summary: pd.DataFrame) -> str:
    import pandas as pd

    a = per_image.attrs
    lines = [
        "# SR evaluation",
        "",
        f"- SR: `{a.get('sr_dir', '?')}`",
        f"- HR: `{a.get('hr_dir', '?')}`",
        f"- images: {len(per_image)} (paired {a.get('pairing', '?')})",
        "- PSNR/SSIM: Y channel (BT.601 ycbcr), no border crop, as pyiqa `test_y_channel=True, color_space='ycbcr'`",
    ]
    if a.get("pairing_warning"):
        lines.append(f"- **{a['pairing_warning']}**")
    if a.get("pairing_note"):
        lines.append(f"- {a['pairing_note'].removeprefix('info: ')}")
    if a.get("alpha_note"):
        lines.append(f"- {a['alpha_note'].removeprefix('info: ')}")
    if a.get("pyiqa"):
        lines.append(f"- learned metrics: pyiqa {a['pyiqa']}")
    lines += ["", "| metric | value | better | status |", "|---|---:|---|---|"]
    for r in summary.itertuples(index=False):
        value = "-" if pd.isna(r.value) else f"{r.value:.4f}"
        better = "lower" if r.lower_better else "higher"
        lines.append(f"| {r.metric.upper()} | {value} | {better} | {r.status} |")
    return "\n".join(lines) + "\n"


def report_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    """The three report files in ``out_dir``, checked: adc replaces only those it wrote there itself
    (the folder's :class:`~compress.ownership.WriteRecord`), so a user's own ``summary.md`` is refused."""
    from .ownership import WriteRecord

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AdcError(f"--out is not a folder: {out}")
    paths = {"per_image": out / "per_image.csv", "summary": out / "summary.csv", "markdown": out / "summary.md"}
    record = WriteRecord(out)
    for path in paths.values():
        record.check(path, hint="move it away or choose another --out")
    return paths


def write_reports(per_image: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write per_image.csv, summary.csv and summary.md into ``out_dir``, each atomically (see :func:`report_paths`)."""
    from .io import atomic_path
    from .ownership import WriteRecord

    paths = report_paths(out_dir)
    out, record = Path(out_dir), WriteRecord(out_dir)
    summary = summarize(per_image)
    try:
        with atomic_path(paths["per_image"], record) as tmp:
            per_image.to_csv(tmp, index=False, float_format="%.6f")
        with atomic_path(paths["summary"], record) as tmp:
            summary.to_csv(tmp, index=False, float_format="%.6f")
        with atomic_path(paths["markdown"], record) as tmp:
            tmp.write_text(_markdown(per_image, summary), encoding="utf-8")
    except OSError as exc:
        raise AdcError(f"cannot write reports to {out}: {exc.strerror or exc}") from None
    return paths


def _default_out(sr_dir: str) -> Path:
    sr = Path(sr_dir).resolve()
    return sr.with_name(sr.name + "_metrics")


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import prog

    parser = argparse.ArgumentParser(
        prog=prog("evaluate"),
        description="Score SR images against HR references (paired by file name; by sorted order, "
                    "with a warning, when no name matches).")
    parser.add_argument("--sr", required=True, help="folder of super-resolved images")
    parser.add_argument("--hr", required=True, help="folder of ground-truth images (same count and sizes)")
    parser.add_argument("--out", default=None, help="report folder (default: <sr>_metrics beside the SR folder)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help=f"comma-separated, from {','.join(DEFAULT_METRICS)} (default: all)")
    parser.add_argument("--device", default=None, help="device for learned metrics (default: cuda if available)")
    args = parser.parse_args(argv)
    from .cli import run_cli

    return run_cli(lambda: _run(args))


def enable_hint(unavailable: dict[str, str]) -> str | None:
    """One line on how to enable the learned metrics that could not run for want of pyiqa or of
    their weight files (the ``iqa`` extra; the folders pyiqa's files must be in), else None."""
    from .metrics.learned import missing_weights

    names = [n for n, why in unavailable.items()
             if n in LEARNED_METRICS and ("pyiqa not installed" in why or "weights not found" in why)]
    if not names:
        return None
    folders = list(dict.fromkeys(str(Path(f).parent) for n in names for f in missing_weights(n)))
    no_pyiqa = any("pyiqa not installed" in unavailable[n] for n in names)
    steps = ['pip install -e ".[iqa]"'] if no_pyiqa else []
    if folders:
        steps.append(f"put their weight files (pyiqa's file names; adc never downloads) in {', '.join(folders)}")
    return (f"learned metrics {', '.join(names)} not computed ({'pyiqa is not installed' if no_pyiqa else 'weights not on disk'}"
            f"); to enable them: {' and '.join(steps)} (the files: LEARNED_METRICS in compress/metrics/learned.py)")


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else _default_out(args.sr)
    report_paths(out)  # before the scoring: a refused --out costs nothing
    df = evaluate_folders(args.sr, args.hr, metrics=args.metrics, device=args.device,
                          log=lambda msg: print(msg, file=sys.stderr, flush=True))
    hint = enable_hint(df.attrs["unavailable"])
    if not computed_metrics(df):
        why = "; ".join(f"{k}: {v}" for k, v in df.attrs["unavailable"].items())
        raise AdcError(f"no metric could be computed ({why}); nothing written" + (f"; {hint}" if hint else ""))
    if hint:
        print(f"info: {hint}", file=sys.stderr, flush=True)
    paths = write_reports(df, out)
    sys.stdout.write(paths["markdown"].read_text(encoding="utf-8"))
    print(f"wrote {paths['per_image']}, {paths['summary']}, {paths['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
