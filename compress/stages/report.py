"""``report``: ``report.md`` and ``report.html`` (+ ``report.csv``, ``report.png``, ``report_images.png``) in the run directory.

It only reads what earlier stages recorded in their ``DONE.json`` artifacts. Built to stand
alone: a summary first with one number per claim (quality from the evaluate stage, on all its
pairs; ratios from the profile stage) and the recipe's goals with a verdict; then what the
analysis classified, what remove/prune changed (every params column counts the whole student),
complexity, quality per method (with crops and per-image scores), training (loss curves and
the recovery stages' own before -> after checks, labelled as such), and the environment the
stages ran in, saying so when it changed between them. ``report.html`` is the same text with
the images inline, to be shared as one file.
"""

from __future__ import annotations

import difflib
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdcError
from ..io import atomic_path, atomic_write_text

# name -> (what is measured, comparison, unit); the prefix says which way the goal points
GOALS: dict[str, tuple[str, str, str]] = {
    "min_psnr_y_gap_to_teacher_db": ("student PSNR-Y minus teacher PSNR-Y (both against HR)", ">=", "dB"),
    "min_student_vs_teacher_psnr_y_db": ("student SR against teacher SR, PSNR-Y", ">=", "dB"),
    "min_student_psnr_y_db": ("student SR against HR, PSNR-Y", ">=", "dB"),
    "max_macs_ratio": ("student MACs / teacher MACs", "<=", "x"),
    "max_params_ratio": ("student params / teacher params", "<=", "x"),
    "min_speedup": ("teacher latency / student latency", ">=", "x"),
}


@dataclass
class ReportConfig:
    title: str | None = None
    # what the run should reach, e.g. {max_macs_ratio: 0.3}; each is printed with its measured value
    # and "reached" / "not reached" (names: GOALS)
    goals: dict[str, float] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        for name in self.goals:
            if name not in GOALS:
                close = difflib.get_close_matches(str(name), list(GOALS), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f" (expected one of: {', '.join(GOALS)})"
                raise AdcError(f"{path}.goals.{name}: unknown goal{hint}")


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


def _summary(art: dict, root: Path, config: ReportConfig) -> list[str]:
    """The headline: one number per claim, where it comes from, and the goals' verdicts."""
    lines: list[str] = []
    e, p = art.get("evaluate"), art.get("profile")
    if e or p:
        lines += ["## Summary", ""]
    if e:
        means = e["means"]
        per_image = f" (per image: [per_image.csv]({_rel(e['per_image'], root)}))" if e.get("per_image") else ""
        n = e["n_images"]
        lines += [f"Quality: the evaluate stage's scores, on its {n} eval pair{'s' if n != 1 else ''}{per_image}.", ""]
        student = means.get("student", {}).get("psnr")
        if student is not None:
            others = ", ".join(f"{m} {means[m]['psnr']:.2f} dB" for m in ("teacher", "bicubic")
                               if "psnr" in means.get(m, {}))
            lines.append(f"- Student SR vs HR: PSNR-Y **{student:.2f} dB**" + (f" ({others})." if others else "."))
        fidelity = (e.get("student_vs_teacher") or {}).get("psnr_student_vs_teacher")
        if fidelity is not None:
            lines.append(f"- Student SR against teacher SR (not HR): PSNR-Y **{fidelity:.2f} dB**, how much of the "
                         "teacher the student keeps.")
    if p:
        r = p["ratios"]
        rows = {row["model"]: row for row in p["rows"]}
        t, s = rows.get("teacher", {}), rows.get("student", {})
        speed = f", {p['latency']['speedup']:.2f}x faster on `{p['latency_device']}`" if p.get("latency") else ""
        lines.append(f"- Student / teacher: params {r['params']:.3f}x ({_m(s.get('params'))} of {_m(t.get('params'))}), "
                     f"MACs {r['macs_total']:.3f}x ({_g(s.get('macs_total'))} of {_g(t.get('macs_total'))}){speed}.")
    if lines:
        lines.append("")
    if config.goals:
        lines += ([] if lines else ["## Summary", ""]) + ["### Goals", "", "What the recipe set out to reach (`report.goals`), against what this run measured:", ""]
        rows = []
        for name, target in config.goals.items():
            what, op, unit = GOALS[name]
            value = _goal_value(name, art)
            verdict = ("not measured" if value is None else
                       "**reached**" if (value >= target if op == ">=" else value <= target) else "not reached")
            fmt = (lambda v: f"{v:.2f} dB") if unit == "dB" else (lambda v: f"{v:.3f}x")
            rows.append([what, f"{op} {fmt(target)}", "–" if value is None else fmt(value), verdict])
        lines += _table(["goal", "target", "measured", "verdict"], rows)
    return lines


def _goal_value(name: str, art: dict) -> float | None:
    means = art.get("evaluate", {}).get("means", {})
    psnr = {m: v.get("psnr") for m, v in means.items()}
    profile = art.get("profile", {})
    if name == "min_psnr_y_gap_to_teacher_db":
        return None if psnr.get("student") is None or psnr.get("teacher") is None else psnr["student"] - psnr["teacher"]
    if name == "min_student_vs_teacher_psnr_y_db":
        return (art.get("evaluate", {}).get("student_vs_teacher") or {}).get("psnr_student_vs_teacher")
    if name == "min_student_psnr_y_db":
        return psnr.get("student")
    if name in ("max_macs_ratio", "max_params_ratio"):
        return profile.get("ratios", {}).get("macs_total" if name == "max_macs_ratio" else "params")
    if name == "min_speedup":
        return (profile.get("latency") or {}).get("speedup")
    return None


NOT_RUN = "not run"


def _db(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} dB"


def quality_chain(art: dict, skipped: dict | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """The quality chain: where the quality goes, link by link, from what the stages recorded.

    1. the teacher's VAE reconstruction with its full decoder (the ceiling of any decoder);
    2. the pruned decoder's reconstruction, before -> after stage 1;
    3. student vs teacher (feature L1, SR PSNR-Y), before -> after stage 2;
    4. student vs HR after stage 2 (same images), and the evaluate stage's teacher and student on all its pairs.
    Rows 1-4a come from the recovery stages' own checks (the first ``data.eval_limit`` eval pairs); a row
    whose stage did not run says so. Returns the markdown lines and report.csv rows.
    """
    skipped = skipped or {}

    def missing(stage: str) -> str:
        if stage not in art:
            return "skipped (see Stopped early)" if stage in skipped else NOT_RUN
        if stage == "evaluate":
            return "not measured (method not in evaluate.methods)"
        if art[stage].get("measured"):
            return "not recorded (the stage ran with an older adc)"
        return "not measured (no eval pairs)"

    rows: list[list[Any]] = []
    csv: list[dict[str, Any]] = []

    def row(key: str, what: str, stage: str, on: str | None, before: str | None, after: str | None,
            note: str = "", values: dict[str, float | None] | None = None) -> None:
        if after is None:
            rows.append([key, what, missing(stage), "", "", ""])
            return
        rows.append([key, what, on, before or "–", after, note])
        for metric, value in (values or {}).items():
            if value is not None:
                csv.append({"section": "quality_chain", "item": f"{key} {what}", "metric": metric, "value": value})

    pre = (art.get("pretrain_decoder") or {}).get("measured_values") or {}
    n1 = pre.get("images")
    on1 = f"first {n1} eval HR" if n1 else None
    ceiling = pre.get("teacher_vae_psnr_y")
    before1, after1 = pre.get("decoder_psnr_y_before"), pre.get("decoder_psnr_y_after")
    row("1", "teacher's VAE, full decoder: HR reconstruction PSNR-Y (the ceiling of any decoder)", "pretrain_decoder",
        on1, None, _db(ceiling) if ceiling is not None else None, values={"after": ceiling})
    row("2", "pruned decoder: HR reconstruction PSNR-Y (stage 1, pretrain_decoder)", "pretrain_decoder", on1,
        _db(before1), _db(after1) if after1 is not None else None,
        f"{after1 - ceiling:+.2f} dB vs the ceiling" if after1 is not None and ceiling is not None else "",
        {"before": before1, "after": after1})

    dist = (art.get("distill") or {}).get("measured_values") or {}
    b, a, n2 = dist.get("before") or {}, dist.get("after") or {}, dist.get("images")
    on2 = f"first {n2} eval pairs" if n2 else None
    fb, fa = b.get("feature_l1"), a.get("feature_l1")
    row("3a", "student vs teacher: feature L1 (stage 2, distill)", "distill", on2,
        None if fb is None else f"{fb:.4f}", None if fa is None else f"{fa:.4f}",
        f"{100 * (fa / fb - 1):+.1f} %" if fa is not None and fb else "", {"before": fb, "after": fa})
    sb, sa = b.get("psnr_student_vs_teacher"), a.get("psnr_student_vs_teacher")
    row("3b", "student SR vs teacher SR, PSNR-Y (stage 2, distill)", "distill", on2, _db(sb),
        _db(sa) if sa is not None else None, "", {"before": sb, "after": sa})
    hb, ha = b.get("psnr_student_vs_hr"), a.get("psnr_student_vs_hr")
    row("4a", "student SR vs HR, PSNR-Y (stage 2's check)", "distill", on2, _db(hb),
        _db(ha) if ha is not None else None, "", {"before": hb, "after": ha})

    e = art.get("evaluate") or {}
    means, m = e.get("means") or {}, e.get("n_images")
    on3 = f"all {m} eval pairs" if m else None
    t, st = (means.get("teacher") or {}).get("psnr"), (means.get("student") or {}).get("psnr")
    fid = (e.get("student_vs_teacher") or {}).get("psnr_student_vs_teacher")
    row("4b", "teacher SR vs HR, PSNR-Y (evaluate)", "evaluate", on3, None, _db(t) if t is not None else None,
        values={"after": t})
    row("4c", "student SR vs HR, PSNR-Y (evaluate)", "evaluate", on3, None, _db(st) if st is not None else None,
        f"{st - t:+.2f} dB vs the teacher" if st is not None and t is not None else "", {"after": st})
    row("4d", "student SR vs teacher SR, PSNR-Y (evaluate)", "evaluate", on3, None,
        _db(fid) if fid is not None else None, values={"after": fid})

    lines = ["## Quality chain", "",
             "Where the quality goes, link by link. Rows 1-4a: the recovery stages' own checks on the first eval "
             "pairs (one batch, float outputs), right before and after each stage trains; rows 4b-4d: the evaluate "
             "stage, on all its pairs (PNG outputs). Reconstruction: HR -> frozen teacher VAE encoder (latent mean) "
             "-> `post_quant_conv` -> decoder, scored against HR.", ""]
    lines += _table(["#", "link", "measured on", "before", "after", "note"], rows)
    return lines, csv


def _structure(art: dict) -> list[str]:
    """remove and prune: each transformation with the module it changed; params of the whole student."""
    lines: list[str] = []
    whole = ("Params count the whole student (UNet + decoder mid-block + up path), here and in every section: "
             "prune starts where remove ends, and ends at the complexity table's student.")
    for stage in ("remove", "prune"):
        if stage not in art:
            continue
        a = art[stage]
        lines += [f"## {stage.capitalize()}", ""]
        if stage == "remove":
            lines += [f"Student initialised from {a['source']}.", ""]
        else:
            lines += [f"UNet widths {a['unet_widths']}, decoder widths {a['decoder_widths']}.", ""]
        records = a.get("records")
        if records and "student_params_before" in records[0]:
            lines += [whole, ""]
            whole = "Params: the whole student, as above."
            lines += _table(["transformation (module: what)", "whole-student params before", "after"],
                            [[f"{r['op']} ({r['part']}{'.' + r['module'] if r['module'] else ''}: {r['what']})",
                              _m(r["student_params_before"]), _m(r["student_params_after"])] for r in records])
        elif records:  # a run made before records named their modules: the part's own params
            lines += _table(["op", "params of the transformed part before", "after"],
                            [[r["op"], _m(r["params_before"]), _m(r["params_after"])] for r in records])
        if stage == "prune" or not records:
            before = a.get("params_before") if stage == "prune" else None
            after = a.get("params_after") if stage == "prune" else a.get("params")
            lines += [f"Student params: {_m(before) + ' -> ' if before is not None else ''}{_m(after)}.", ""]
    return lines


def _training(art: dict, root: Path) -> list[str]:
    trained = [s for s in ("train_teacher", "pretrain_decoder", "distill") if s in art]
    if not trained:
        return []
    lines = ["## Training", ""]
    rows = []
    for s in trained:
        a = art[s]
        rows.append([s, a.get("steps"), f"{a['steps_per_s']:.2f}" if a.get("steps_per_s") else "–",
                     f"![{s}]({_rel(a.get('loss_curve'), root)})" if a.get("loss_curve") else "–"])
    lines += _table(["stage", "steps", "steps/s", "loss curve"], rows)
    checks = [s for s in trained if art[s].get("measured")]
    if checks:
        counts = sorted({str(art[s].get("measured_images", "?")) for s in checks})
        total = art.get("evaluate", {}).get("n_images")
        lines += [f"What each recovery stage bought: its own check right before and after training, on the first "
                  f"{' / '.join(counts)} eval pairs (one batch, float outputs before PNG rounding). A before -> after "
                  "comparison, not the headline: the Summary's numbers are the evaluate stage's"
                  + (f", on its {total} pair{'s' if total != 1 else ''}." if total else "."), ""]
        lines += _table(["stage", "check", "before -> after"],
                        [[s, k, v] for s in checks for k, v in art[s]["measured"].items()])
    return lines


def _environment(bundle, stage_dir: Path) -> list[str]:
    """The environment this report ran in, and every change from what the earlier stages recorded."""
    from ..environment import collect, differences, recorded_environments

    current = collect(bundle.device)
    recorded = recorded_environments(bundle.run_dir, exclude=stage_dir.name)
    lines = ["## Environment", ""]
    changed = differences(recorded, current)
    if changed:
        lines += ["**The environment differs from what earlier stages of this run recorded** (a `--resume` or a "
                  "later stage ran elsewhere or after an upgrade; numbers may differ from a run made in one go):", ""]
        lines += [f"- {c}" for c in changed] + [""]
    elif recorded:
        lines += [f"All {len(recorded)} earlier stages recorded this same environment (versions, device, threads; "
                  "each stage's `DONE.json` holds its own).", ""]
    commit = current.get("git_commit")
    if commit and current.get("git_uncommitted_changes"):
        current = {**current, "git_commit": f"{commit} (with uncommitted changes)"}
    current.pop("git_uncommitted_changes", None)
    lines += _table(["", "this report"], [[k, "–" if v is None else f"`{v}`"] for k, v in current.items()])
    return lines


def run_report(bundle, config: ReportConfig, stage_dir: Path) -> dict[str, Any]:
    recipe, art, root = bundle.recipe, bundle.artifacts, bundle.run_dir
    task = recipe.task
    lines = [f"# {config.title or f'adc run: {recipe.name}'}", ""]
    command = " ".join(["python -m compress.run", shlex.quote(_rel(str(recipe.source), Path.cwd()) if recipe.source else recipe.name)]
                       + [f"--set {shlex.quote(o)}" for o in recipe.overrides])
    lines += [f"Made by `{command}`; models: family {recipe.models.family}, {recipe.models.size} size; "
              f"task: x{task.scale}, t = {task.timestep}, prompt {task.prompt}. Versions and device: "
              "[Environment](#environment).", ""]
    csv_rows: list[dict[str, Any]] = []

    if bundle.skipped:
        lines += ["## Stopped early", "", "These stages were skipped because the recipe does not give what they need:", ""]
        lines += [f"- **{name}**: {'; '.join(needs)}" for name, needs in bundle.skipped.items()] + [""]
    lines += _summary(art, root, config)
    if bundle.notes:
        lines += ["## Notes", "", "What was skipped, replaced or simplified in this run, and why:", ""]
        lines += [f"- {n}" for n in bundle.notes] + [""]
    chain, chain_csv = quality_chain(art, bundle.skipped)
    lines += chain
    csv_rows += chain_csv

    if "analyse" in art:
        a = art["analyse"]
        lines += ["## Analysis of the teacher", "",
                  f"Every module classified from the dataflow ({a['device']}, LR {a['lr_size']} px, {a['counter']}); "
                  f"details in `{_rel(a['report'], root)}`.", ""]
        rows = [[cls, _m(v["params"]), _g(v["macs"])] for cls, v in a["summary"].items() if v["params"] or v["macs"]]
        lines += _table(["class", "teacher params", "MACs"], rows)
        teacher = next((r for r in art.get("profile", {}).get("rows", []) if r["model"] == "teacher"), None)
        total = a["summary"].get("total", {}).get("macs")
        if teacher is not None and total is not None and total != teacher["macs_total"]:
            lines += [f"These MACs ({_g(total)}) count the teacher as it runs here, LoRA adapters unmerged "
                      f"({_g(teacher.get('macs_lora_unmerged', 0))} of them); the complexity table below counts it as "
                      f"deployed, adapters merged into the weights ({_g(teacher['macs_total'])}).", ""]

    lines += _structure(art)

    if "profile" in art:
        p = art["profile"]
        lat_dev = p["latency_device"]
        timing = (f"Latency: best median of 2 alternating rounds on `{lat_dev}` ({p['dtype']}, "
                  f"{p['latency']['teacher']['device_name']})." if p["latency"] else
                  "Latency: not measured (full size on a CPU; see reports/complexity.md and profiling/gpu_bench.sh).")
        lines += ["## Complexity: teacher vs student", "",
                  f"Params and MACs: {p['counter']}, fp32, LR {p['lr_size']} -> SR {p['sr_size']}, batch 1; params of the "
                  f"whole teacher and the whole student. {timing}", ""]
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

    if "quantize" in art:  # the quantize stage's gate: which file ships, and what it measured
        qa = art["quantize"]
        lines += ["## int8 quantization", "", f"**{qa['verdict']}** Shipped file: `{_rel(qa['file'], root)}`; "
                  f"details: `{_rel(qa['report'], root)}`. {qa['device']}, LR {qa['lr_size'][0]}x{qa['lr_size'][1]} "
                  f"-> x{task.scale}, quality int8 vs fp32 on {qa['check_images']} held-out training crops.", ""]
        lines += _table(["", "fp32", "int8 (QDQ)"],
                        [["latency (median)", f"{qa['latency_ms']['fp32']:.1f} ms", f"{qa['latency_ms']['int8']:.1f} ms"],
                         ["file", f"{qa['bytes']['fp32'] / 2**20:.2f} MiB", f"{qa['bytes']['int8'] / 2**20:.2f} MiB"],
                         ["PSNR vs fp32", "-", "identical" if qa["psnr_int8_vs_fp32_db"] is None
                          else f"{qa['psnr_int8_vs_fp32_db']:.2f} dB"]])
        for key in ("fp32", "int8"):
            csv_rows.append({"section": "quantize", "item": key, "metric": "latency_ms", "value": qa["latency_ms"][key],
                             "device": qa["device"], "dtype": key, "resolution": f"{qa['lr_size'][0]}->x{task.scale}",
                             "counter": "wall clock, median, fp32 and int8 calls alternating"})

    if "evaluate" in art:
        e = art["evaluate"]
        per_image = f"; per-image scores: [per_image.csv]({_rel(e['per_image'], root)})" if e.get("per_image") else ""
        lines += ["## Quality on held-out pairs" if _held_out(recipe.data) else
                  "## Quality on the eval pairs (NOT held out: they are also training images)", "",
                  f"{e['n_images']} LR/HR pairs from `{display_path(recipe.data.eval_lr)}`; PSNR/SSIM on Y (pyiqa-exact, no border "
                  f"crop); {e['device']}, {e['dtype']}, LR {e['lr_size'][0]}x{e['lr_size'][1]} -> x{task.scale}{per_image}.", ""]
        metrics = sorted({m for v in e["means"].values() for m in v})
        lines += _table(["method (mean over the pairs)"] + metrics,
                        [[method] + [f"{vals.get(m, float('nan')):.4f}" for m in metrics] for method, vals in e["means"].items()])
        fidelity = (e.get("student_vs_teacher") or {}).get("psnr_student_vs_teacher")
        if fidelity is not None:
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

    lines += _training(art, root)
    png = _plot(art, root / "report.png", f"{recipe.name}: teacher vs student")
    if png:
        lines += ["![summary](report.png)", ""]
    lines += _environment(bundle, stage_dir)
    text = "\n".join(lines)
    md = atomic_write_text(root / "report.md", text)
    from .report_html import write_html

    html = write_html(text, root / "report.html", root, title=config.title or f"adc run: {recipe.name}")
    import pandas as pd

    with atomic_path(root / "report.csv") as tmp:
        pd.DataFrame(csv_rows).to_csv(tmp, index=False)
    return {"report": bundle.rel(md), "html": bundle.rel(html), "csv": bundle.rel(root / "report.csv"),
            "png": bundle.rel(png) if png else None}


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
