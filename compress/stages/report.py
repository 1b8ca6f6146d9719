"""``report``: one ``report.md`` (+ ``report.csv``, ``report.png``, ``report_images.png``) in the run directory.

It only reads what earlier stages recorded in their ``DONE.json`` artifacts: what the analysis
classified, what remove/prune changed, params/MACs/latency of teacher vs student, quality on
held-out pairs (with LR/bicubic/teacher/student/HR crops side by side), the training curves, and which stages were skipped for want of weights.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_path, atomic_write_text


@dataclass
class ReportConfig:
    title: str | None = None


def run_report_needs(bundle, config: ReportConfig) -> list[str]:
    return []


def _m(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e6:,.2f} M"


def _g(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e9:,.2f} G"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def display_path(path: str | Path | None) -> str:
    """A path as a report shows it: relative to the working directory when inside it (no machine paths)."""
    if path is None:
        return "-"
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _rel(path: str | None, root: Path) -> str | None:
    """A path for the report: artifact paths are already relative to the run directory."""
    if not path:
        return None
    if not os.path.isabs(path):
        return path
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def run_report(bundle, config: ReportConfig, stage_dir: Path) -> dict[str, Any]:
    recipe, art, root = bundle.recipe, bundle.artifacts, bundle.run_dir
    task = recipe.task
    lines = [f"# {config.title or f'adc run: {recipe.name}'}", ""]
    command = " ".join(["python -m compress.run", shlex.quote(_rel(str(recipe.source), Path.cwd()) if recipe.source else recipe.name)]
                       + [f"--set {shlex.quote(o)}" for o in recipe.overrides])
    lines += [f"Made by `{command}`; models: family {recipe.models.family}, {recipe.models.size} size; "
              f"task: x{task.scale}, t = {task.timestep}, prompt {task.prompt}. Python {sys.version.split()[0]}.", ""]
    csv_rows: list[dict[str, Any]] = []

    if bundle.skipped:
        lines += ["## Stopped early", "", "These stages were skipped because the recipe does not give what they need:", ""]
        lines += [f"- **{name}**: {'; '.join(needs)}" for name, needs in bundle.skipped.items()] + [""]
    if bundle.notes:
        lines += ["## Notes", "", "What was skipped, replaced or simplified in this run, and why:", ""]
        lines += [f"- {n}" for n in bundle.notes] + [""]

    if "analyse" in art:
        a = art["analyse"]
        lines += ["## Analysis of the teacher", "",
                  f"Every module classified from the dataflow ({a['device']}, LR {a['lr_size']} px, {a['counter']}); "
                  f"details in `{_rel(a['report'], root)}`.", ""]
        rows = [[cls, _m(v["params"]), _g(v["macs"])] for cls, v in a["summary"].items() if v["params"] or v["macs"]]
        lines += _table(["class", "params", "MACs"], rows)
        teacher = next((r for r in art.get("profile", {}).get("rows", []) if r["model"] == "teacher"), None)
        total = a["summary"].get("total", {}).get("macs")
        if teacher is not None and total is not None and total != teacher["macs_total"]:
            lines += [f"These MACs ({_g(total)}) count the teacher as it runs here, LoRA adapters unmerged "
                      f"({_g(teacher.get('macs_lora_unmerged', 0))} of them); the complexity table below counts it as "
                      f"deployed, adapters merged into the weights ({_g(teacher['macs_total'])}).", ""]

    for stage in ("remove", "prune"):
        if stage in art:
            a = art[stage]
            if stage == "remove":
                lines += ["## Remove", "", f"Student initialised from {a['source']}. Transformations:", ""]
                lines += _table(["op", "params before", "params after"],
                                [[r["op"], _m(r["params_before"]), _m(r["params_after"])] for r in a["records"]])
            else:
                lines += ["## Prune", "", f"Params {_m(a['params_before'])} -> {_m(a['params_after'])}; UNet widths "
                          f"{a['unet_widths']}, decoder widths {a['decoder_widths']}.", ""]

    if "profile" in art:
        p = art["profile"]
        lat_dev = p["latency_device"]
        timing = (f"Latency: best median of 2 alternating rounds on `{lat_dev}` ({p['dtype']}, "
                  f"{p['latency']['teacher']['device_name']})." if p["latency"] else
                  "Latency: not measured (full size on a CPU; see reports/complexity.md and profiling/gpu_bench.sh).")
        lines += ["## Complexity: teacher vs student", "",
                  f"Params and MACs: {p['counter']}, fp32, LR {p['lr_size']} -> SR {p['sr_size']}, batch 1. {timing}", ""]
        rows = []
        for r in p["rows"]:
            rows.append([r["model"], _m(r["params"]), _g(r["macs_conv_linear"]), _g(r["macs_attention"]),
                         _g(r["macs_total"]), "–" if r["latency_ms"] is None else f"{r['latency_ms']:.1f} ms"])
            for key in ("params", "macs_conv_linear", "macs_attention", "macs_total"):
                csv_rows.append({"section": "complexity", "item": r["model"], "metric": key, "value": r[key],
                                 "device": "meta", "dtype": "fp32", "resolution": f"{p['lr_size']}->{p['sr_size']}",
                                 "counter": p["counter"]})
            if r["latency_ms"] is not None:
                csv_rows.append({"section": "complexity", "item": r["model"], "metric": "latency_ms",
                                 "value": r["latency_ms"], "device": lat_dev, "dtype": p["dtype"],
                                 "resolution": f"{p['lr_size']}->{p['sr_size']}", "counter": "wall clock, median"})
        lines += _table(["model", "params", "MACs conv+linear", "MACs attention", "MACs total", "latency"], rows)
        ratios = p["ratios"]
        lines += [f"Student / teacher: params {ratios['params']:.3f} ({(1 - ratios['params']) * 100:.1f} % fewer), "
                  f"MACs {ratios['macs_total']:.3f} ({(1 - ratios['macs_total']) * 100:.1f} % fewer)"
                  + (f", {p['latency']['speedup']:.2f}x faster" if p["latency"] else "") + ".", ""]

    if "evaluate" in art:
        e = art["evaluate"]
        lines += ["## Quality on held-out pairs" if _held_out(recipe.data) else
                  "## Quality on the eval pairs (NOT held out: they are also training images)", "",
                  f"{e['n_images']} LR/HR pairs from `{display_path(recipe.data.eval_lr)}`; PSNR/SSIM on Y (pyiqa-exact, no border "
                  f"crop); {e['device']}, {e['dtype']}, LR {e['lr_size'][0]}x{e['lr_size'][1]} -> x{task.scale}.", ""]
        metrics = sorted({m for v in e["means"].values() for m in v})
        lines += _table(["method"] + metrics,
                        [[method] + [f"{vals.get(m, float('nan')):.4f}" for m in metrics] for method, vals in e["means"].items()])
        fidelity = (e.get("student_vs_teacher") or {}).get("psnr_student_vs_teacher")
        if fidelity is not None:
            lines += [f"Student SR against teacher SR (not HR): PSNR-Y {fidelity:.2f} dB, how much of the teacher "
                      "the student keeps.", ""]
            csv_rows.append({"section": "quality", "item": "student_vs_teacher", "metric": "psnr", "value": fidelity,
                             "device": e["device"], "dtype": e["dtype"],
                             "resolution": f"{e['lr_size'][0]}->x{task.scale}", "counter": "pyiqa-exact Y"})
        if e.get("folders") and e.get("lr_folder"):
            from .image_grid import write_image_grid

            columns = {m: bundle.resolve(f) for m, f in e["folders"].items()}
            grid = write_image_grid(columns, bundle.resolve(e["lr_folder"]), bundle.resolve(e["hr_folder"]),
                                    e["names"], task.scale, root / "report_images.png")
            if grid:
                lines += ["![LR, each method and HR on the same crops](report_images.png)", ""]
        for method, vals in e["means"].items():
            for m, v in vals.items():
                csv_rows.append({"section": "quality", "item": method, "metric": m, "value": v, "device": e["device"],
                                 "dtype": e["dtype"], "resolution": f"{e['lr_size'][0]}->x{task.scale}",
                                 "counter": "pyiqa-exact Y"})

    trained = [s for s in ("train_teacher", "pretrain_decoder", "distill") if s in art]
    if trained:
        lines += ["## Training", ""]
        rows = []
        for s in trained:
            a = art[s]
            rows.append([s, a.get("steps"), f"{a['steps_per_s']:.2f}" if a.get("steps_per_s") else "–",
                         f"![{s}]({_rel(a.get('loss_curve'), root)})" if a.get("loss_curve") else "–"])
        lines += _table(["stage", "steps", "steps/s", "loss curve"], rows)
        for s in trained:
            for k, v in (art[s].get("measured") or {}).items():
                lines.append(f"- {s}: {k} = {v}")
        lines.append("")

    png = _plot(art, root / "report.png", f"{recipe.name}: teacher vs student")
    if png:
        lines += ["![summary](report.png)", ""]
    md = atomic_write_text(root / "report.md", "\n".join(lines))
    import pandas as pd

    with atomic_path(root / "report.csv") as tmp:
        pd.DataFrame(csv_rows).to_csv(tmp, index=False)
    return {"report": str(md), "csv": str(root / "report.csv"), "png": str(png) if png else None}


def _held_out(data) -> bool:
    """False when the eval HR folder is (inside) one of the training folders, or contains one."""
    if data.eval_hr is None:
        return True
    ev = Path(data.eval_hr).resolve()
    for t in data.train_hr:
        t = Path(t).resolve()
        if ev == t or t in ev.parents or ev in t.parents:
            return False
    return True


# One colour per method, in every panel of every adc figure.
METHOD_COLORS = {"bicubic": "#8c8c8c", "teacher": "#1f77b4", "student": "#ff7f0e", "HR": "#2ca02c", "LR": "#9467bd"}


def _plot(art: dict, path: Path, title: str) -> Path | None:
    """Bars: params and MACs (teacher vs student) and PSNR per method, when measured."""
    panels = []
    if "profile" in art:
        rows = art["profile"]["rows"]
        panels.append(("params (M)", [r["model"] for r in rows], [r["params"] / 1e6 for r in rows]))
        panels.append(("MACs (G)", [r["model"] for r in rows], [r["macs_total"] / 1e9 for r in rows]))
    if "evaluate" in art and any("psnr" in v for v in art["evaluate"]["means"].values()):
        means = art["evaluate"]["means"]
        panels.append(("PSNR-Y (dB)", list(means), [v.get("psnr", float("nan")) for v in means.values()]))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (label, names, values) in zip(axes if len(panels) > 1 else [axes], panels):
        ax.bar(names, values, color=[METHOD_COLORS.get(n, "#333333") for n in names])
        ax.set_title(label)
        ax.set_ylabel(label)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
