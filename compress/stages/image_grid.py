"""An image grid for ``report.md``: LR, bicubic, teacher, student and HR crops side by side.

Why a crop and not the whole image: at x4 the differences between methods live in textures a
few dozen pixels wide; a full 512 px image shrunk into a report column hides them. The crop is
the window with the most HR detail (gradient energy), so it is chosen the same way on every run
and shows what the model must reconstruct rather than a flat sky.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_path


def _read(path: Path) -> np.ndarray:
    from ..metrics.images import load_image

    return (load_image(path)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def detail_window(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner (y, x) of the ``size``-px window with the largest gradient energy (stride size/4)."""
    luma = hr.astype(np.float32).mean(axis=2)
    energy = np.abs(np.diff(luma, axis=0))[:, :-1] + np.abs(np.diff(luma, axis=1))[:-1, :]
    h, w = energy.shape
    size = min(size, h, w)
    stride = max(1, size // 4)
    best, corner = -1.0, (0, 0)
    for y in range(0, h - size + 1, stride):
        for x in range(0, w - size + 1, stride):
            score = float(energy[y:y + size, x:x + size].sum())
            if score > best:
                best, corner = score, (y, x)
    return corner


def crop_psnr_y(sr: np.ndarray, hr: np.ndarray) -> float:
    """PSNR-Y (dB) of two HxWx3 uint8 crops, the same measure as the report's tables (pyiqa-exact Y)."""
    import torch

    from ..metrics import psnr_y

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].double() / 255

    return float(psnr_y(t(sr), t(hr))[0])


def write_image_grid(columns: dict[str, Path], lr_dir: Path, hr_dir: Path, names: list[str], scale: int,
                     out: Path, crop: int = 128, rows: int = 3) -> Path | None:
    """One row per image (first ``rows`` of ``names``): LR (nearest x``scale``), each method folder, HR.

    ``columns`` maps a method name to its folder of SR PNGs; every folder, ``lr_dir`` and ``hr_dir``
    hold ``<name>.png`` (as the evaluate stage writes them). Each method's tile carries its crop's
    PSNR-Y against HR, so what the eye sees can be checked against a number on the same pixels.
    Returns None when there is nothing to show.
    """
    names = [n for n in names if (lr_dir / f"{n}.png").exists() and (hr_dir / f"{n}.png").exists()][:rows]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import METHOD_COLORS

    titles = ["LR"] + list(columns) + ["HR"]
    fig, axes = plt.subplots(len(names), len(titles), figsize=(2.2 * len(titles), 2.35 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        hr = _read(hr_dir / f"{name}.png")
        y, x = detail_window(hr, crop)
        c = min(crop, hr.shape[0], hr.shape[1])
        lr = _read(lr_dir / f"{name}.png").repeat(scale, axis=0).repeat(scale, axis=1)
        tiles = [lr] + [_read(folder / f"{name}.png") for folder in columns.values()] + [hr]
        for col, (title, img) in enumerate(zip(titles, tiles)):
            ax = axes[r][col]
            tile = img[y:y + c, x:x + c]
            ax.imshow(tile, interpolation="nearest")
            if title in columns:
                ax.text(0.03, 0.04, f"{crop_psnr_y(tile, hr[y:y + c, x:x + c]):.2f} dB", transform=ax.transAxes,
                        fontsize=8, va="bottom", ha="left",
                        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8, "lw": 0})
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(METHOD_COLORS.get(title, "#333333"))
                spine.set_linewidth(2)
            if r == 0:
                ax.set_title(title, fontsize=10, color=METHOD_COLORS.get(title, "#333333"))
            if col == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(f"{c} px crops of the SR output (x{scale}); LR shown nearest-upsampled; "
                 "on each method: PSNR-Y of that crop vs HR", fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
