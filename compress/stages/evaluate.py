"""``evaluate``: bicubic, teacher and student on the eval LR/HR pairs, PSNR/SSIM (Y, pyiqa-exact).

SR images are written as PNGs (one folder per method) and scored with
:func:`compress.evaluate.evaluate_folders`, the same code as ``python -m compress.evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..errors import AdcError
from ..config import ranged

Method = Literal["bicubic", "teacher", "student"]


@dataclass
class EvaluateConfig:
    methods: list[Method] = field(default_factory=lambda: ["bicubic", "teacher", "student"])
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim"])
    limit: int | None = ranged(None, 1, 10**9)  # first N pairs only (None = all)

    def validate(self, path: str) -> None:
        if not self.methods:
            raise AdcError(f"{path}.methods: empty; expected some of bicubic, teacher, student")


def run_evaluate_needs(bundle, config: EvaluateConfig) -> list[str]:
    data = bundle.recipe.data
    needs = [] if data.eval_lr and data.eval_hr else ["data.eval_lr and data.eval_hr (paired LR/HR folders)"]
    if "teacher" in config.methods:
        needs += bundle.teacher_needs()
        if bundle.size == "full":
            needs += bundle.family.evaluate_needs(bundle.weights)
    if "student" in config.methods and bundle.size == "full" and not bundle.has_trained_student():
        needs.append("a trained student (pretrain_decoder + distill must run first; a released student is "
                     "evaluated with python -m compress.sr + python -m compress.evaluate)")
    return sorted(set(needs))


def _save_png(img01: torch.Tensor, path: Path) -> None:
    from PIL import Image

    from ..io import atomic_path

    arr = (img01.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


@torch.no_grad()
def run_evaluate(bundle, config: EvaluateConfig, stage_dir: Path) -> dict[str, Any]:
    from ..data import PairedFolderDataset
    from ..evaluate import evaluate_folders, summarize
    from ..log import progress

    data = bundle.recipe.data
    pairs = PairedFolderDataset(data.eval_lr, data.eval_hr, scale=bundle.recipe.task.scale)
    limit = config.limit or data.eval_limit or len(pairs)
    device = bundle.device
    family, options = bundle.family, bundle.options
    models = {}
    if "teacher" in config.methods:
        teacher = bundle.teacher()
        models["teacher"] = lambda lr01: family.evaluate_teacher(teacher, lr01, options)  # the family's test script
    if "student" in config.methods:
        student = bundle.student_state().model.to(device).eval()
        models["student"] = lambda lr01: (student(lr01 * 2 - 1).float() + 1) / 2
    hr_dir = stage_dir / "HR"
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    tables = []
    names = []
    for i in range(min(limit, len(pairs))):
        item = pairs[i]
        names.append(item["name"])
        _save_png(item["hr"], hr_dir / f"{item['name']}.png")
        _save_png(item["lr"], stage_dir / "LR" / f"{item['name']}.png")  # beside HR, for the report's image grid
    for method in config.methods:
        out_dir = stage_dir / method
        for i in progress(range(len(names)), f"evaluate {method}"):
            item = pairs[i]
            lr = item["lr"].unsqueeze(0).to(device)
            if method == "bicubic":
                sr = F.interpolate(lr, scale_factor=bundle.recipe.task.scale, mode="bicubic", align_corners=False)
            else:
                sr = models[method](lr)
            _save_png(sr[0], out_dir / f"{item['name']}.png")
        frame = evaluate_folders(out_dir, hr_dir, metrics=config.metrics)
        summary = summarize(frame)
        frame.insert(0, "method", method)
        tables.append(frame)
        ok = summary["status"] == "ok"
        results[method] = {row["metric"]: row["value"] for _, row in summary[ok].iterrows()}
        for _, row in summary[~ok].iterrows():  # never a nan column: what was not computed, and why
            skipped.setdefault(row["metric"], row["status"])
    import pandas as pd

    from ..io import atomic_path

    per_image = pd.concat(tables, ignore_index=True)
    with atomic_path(stage_dir / "per_image.csv") as tmp:
        per_image.to_csv(tmp, index=False, float_format="%.6f")
    for metric, why in skipped.items():
        bundle.note(f"evaluate: {metric} not computed: {why}")
    fidelity = None
    if "teacher" in config.methods and "student" in config.methods:
        # How much of the teacher the student keeps: its SR scored against the teacher's SR, not HR.
        frame = evaluate_folders(stage_dir / "student", stage_dir / "teacher", metrics=["psnr"])
        fidelity = {"psnr_student_vs_teacher": float(frame["psnr"].mean())}
    return {"n_images": len(names), "means": results, "student_vs_teacher": fidelity, "names": names, "folders": {m: bundle.rel(stage_dir / m) for m in config.methods},
            "hr_folder": bundle.rel(hr_dir), "lr_folder": bundle.rel(stage_dir / "LR"), "skipped_metrics": skipped, "per_image": bundle.rel(stage_dir / "per_image.csv"),
            "device": str(device), "dtype": "fp32", "lr_size": list(item["lr"].shape[-2:])}
