"""Recovery methods compared on the demo, same data, steps and seeds (``reports/recovery.{md,csv}``).

    python profiling/bench_recovery.py --jobs 2                 # every variant, seed 0; the best two x 3 seeds
    python profiling/bench_recovery.py --variants adcsr,output --seeds 1

Why: a compressed student is worth what it keeps of its teacher. Each variant is
``recipes/adcsr-tiny.yaml`` run up to ``evaluate`` with only its recovery settings changed (stated
in full below, so the table does not move when the demo's own defaults do): the shipped trained
teacher, the same pruned widths, the same training crops and degradation, the same step budget.
Each row is the run's quality chain (the teacher VAE's reconstruction ceiling, the pruned
decoder before/after stage 1, student vs teacher before/after stage 2, student vs HR) and the
evaluate stage's student PSNR-Y on the six held-out RealSR pairs. The two best variants run again
with more seeds, so that seed noise is measured rather than guessed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "adcsr-tiny.yaml"
STAGES = "analyse,remove,prune,pretrain_decoder,distill,evaluate"

# Settings every variant states, so that a variant is the same whatever the demo recipe's defaults are.
_STEPS1 = "stages.pretrain_decoder.engine.max_steps=1000"
# Every variant: the demo's stage-2 budget and learning rate, whatever the demo recipe says today.
_COMMON = ["stages.distill.engine.max_steps=250", "stages.distill.lr_g=1e-3", "stages.distill.lr_milestones=[200]",
           "stages.distill.adv_weight=0.1"]
_STAGE1_ADCSR = ["stages.pretrain_decoder.lr=1e-3", "stages.pretrain_decoder.adv_weight=0.1",
                 "stages.pretrain_decoder.disc_start=100", "stages.pretrain_decoder.keep_best=false", _STEPS1]
_STAGE2_ADCSR = ["stages.distill.output_weight=0", "stages.distill.train_up=false",
                 "stages.distill.init_conv_in=as_is", "stages.distill.feature_weight=1"]
_STAGE1_FIXED = ["stages.pretrain_decoder.lr=3e-4", "stages.pretrain_decoder.adv_weight=0",
                 "stages.pretrain_decoder.keep_best=true", _STEPS1]
_OUTPUT = ["stages.distill.output_weight=1", "stages.distill.train_up=true", "stages.distill.output_color_fix=true"]
_MAGNITUDE = ["stages.prune.unet.method=channels", "stages.prune.unet.channels.pruning_ratio=0.25",
              "stages.prune.unet.channels.importance=magnitude"]

# name -> (what it is, overrides of recipes/adcsr-tiny.yaml)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "adcsr": ("AdcSR's objectives at the demo's budget (stage 1: L1 + GAN from step 100, lr 1e-3, last step; "
              "stage 2: decoder mid-block feature L1 + UNet discriminator)", _STAGE1_ADCSR + _STAGE2_ADCSR),
    "stage1": ("stage 1 fixed: no GAN, lr 3e-4, the best step by PSNR-Y on 8 training crops kept (stage 2 as AdcSR)",
               _STAGE1_FIXED + _STAGE2_ADCSR),
    "output": ("stage 1 fixed + output-level distillation (student SR vs teacher SR after the colour fix, "
               "pixel L1, weight 1; the up path trains too)",
               _STAGE1_FIXED + _OUTPUT + ["stages.distill.init_conv_in=as_is", "stages.distill.feature_weight=1"]),
    "lstsq": ("stage 1 fixed + closed-form init of the new input conv (ridge least squares against the "
              "teacher's conv_in on its latent path; stage 2 as AdcSR)",
              _STAGE1_FIXED + ["stages.distill.output_weight=0", "stages.distill.train_up=false",
                               "stages.distill.init_conv_in=lstsq", "stages.distill.feature_weight=1"]),
    "output+lstsq": ("stage 1 fixed + output-level distillation + closed-form input conv",
                     _STAGE1_FIXED + _OUTPUT + ["stages.distill.init_conv_in=lstsq", "stages.distill.feature_weight=1"]),
    "output+lstsq+magnitude": ("as output+lstsq, the UNet pruned by magnitude importance (torch-pruning "
                               "groups) instead of AdcSR's leading slice, same widths",
                               _STAGE1_FIXED + _OUTPUT + ["stages.distill.init_conv_in=lstsq",
                                                          "stages.distill.feature_weight=1",
                                                "stages.prune.unet.method=channels",
                                                "stages.prune.unet.channels.pruning_ratio=0.25",
                                                "stages.prune.unet.channels.importance=magnitude"]),
    "lstsq+magnitude": ("lstsq with the UNet pruned by magnitude (stage 2 as AdcSR): the baseline of "
                        "block+lstsq+magnitude", _STAGE1_FIXED + _STAGE2_ADCSR[:2] + _MAGNITUDE
                        + ["stages.distill.init_conv_in=lstsq", "stages.distill.feature_weight=1"]),
    "block+lstsq+magnitude": ("as output+lstsq+magnitude with block-wise feature distillation instead of the output "
                              "term (BK-SDM: each UNet down/mid/up block's output against the teacher UNet's, "
                              "through a 1x1 projector fitted by least squares on the first batch and trained, "
                              "L1 over the teacher feature's mean magnitude, block_weight 1 on the mean over "
                              "the 9 blocks; the up path frozen, as AdcSR)",
                              _STAGE1_FIXED + _STAGE2_ADCSR[:2] + _MAGNITUDE
                              + ["stages.distill.init_conv_in=lstsq", "stages.distill.feature_weight=1",
                                 "stages.distill.block_weight=1"]),
    "output+block+lstsq+magnitude": ("output+lstsq+magnitude plus block-wise feature distillation (block_weight 1)",
                                     _STAGE1_FIXED + _OUTPUT + _MAGNITUDE
                                     + ["stages.distill.init_conv_in=lstsq", "stages.distill.feature_weight=1",
                                        "stages.distill.block_weight=1"]),
    "output+block0.1+lstsq+magnitude": ("as output+block+lstsq+magnitude with block_weight 0.1",
                                        _STAGE1_FIXED + _OUTPUT + _MAGNITUDE
                                        + ["stages.distill.init_conv_in=lstsq", "stages.distill.feature_weight=1",
                                           "stages.distill.block_weight=0.1"]),
}


def _done(run: Path) -> dict[str, dict]:
    return {d.parent.name.split("-", 1)[1]: json.loads(d.read_text()) for d in run.glob("*/DONE.json")}


def run_variant(work: Path, name: str, seed: int, extra: list[str], keep: bool) -> dict:
    """One variant through the demo recipe up to evaluate, in its own process (one thread)."""
    run = work / f"{name}-seed{seed}"
    shutil.rmtree(run, ignore_errors=True)
    sets = _COMMON + VARIANTS[name][1] + extra + [
        f"seed={seed}", f"stages.pretrain_decoder.engine.seed={seed}", f"stages.distill.engine.seed={seed}"]
    cmd = [sys.executable, "-m", "compress.run", str(RECIPE), "--out", str(run), "--stages", STAGES,
           *[a for o in sets for a in ("--set", o)]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"error: variant {name} seed {seed} failed (exit {proc.returncode}): {tail}")
    done = _done(run)
    s1, s2, ev = (done[k]["artifacts"] for k in ("pretrain_decoder", "distill", "evaluate"))
    row = {"variant": name, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
           "vae_ceiling": s1["measured_values"]["teacher_vae_psnr_y"],
           "decoder_before": s1["measured_values"]["decoder_psnr_y_before"],
           "decoder_after": s1["measured_values"]["decoder_psnr_y_after"],
           "measure_images": s2["measured_values"]["images"],
           **{f"{k}_{when}": s2["measured_values"][when][k] for when in ("before", "after")
              for k in ("feature_l1", "psnr_student_vs_teacher", "psnr_student_vs_hr")},
           "eval_student": ev["means"]["student"]["psnr"], "eval_teacher": ev["means"].get("teacher", {}).get("psnr"),
           "eval_bicubic": ev["means"].get("bicubic", {}).get("psnr"), "eval_images": ev["n_images"],
           "environment": done["evaluate"].get("environment", {})}
    if not keep:
        shutil.rmtree(run, ignore_errors=True)
    return row


def _fmt(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_report(rows: list[dict], out: Path, command: str, wall: float, jobs: int) -> str:
    env = rows[0]["environment"]
    first = [r for r in rows if r["seed"] == rows[0]["seed"]]
    md = [f"`{command}`", "", "# Recovery methods on the demo: measured", "",
          f"Device: {env.get('device', platform.processor() or platform.machine())}, fp32, 1 thread per run, "
          f"{jobs} run(s) at once; torch {env.get('torch')}, diffusers {env.get('diffusers')}, transformers "
          f"{env.get('transformers')}, peft {env.get('peft')}, adc {env.get('adc')} ({str(env.get('git_commit'))[:10]}); "
          f"wall time {wall / 60:.1f} min.", "",
          "Each row is `recipes/adcsr-tiny.yaml` up to `evaluate` with only the recovery settings changed (the "
          "variants are stated in full in `profiling/bench_recovery.py`): the shipped trained tiny teacher, the "
          "same half-width decoder and 0.75-width UNet, the 24 training crops, the same degradation, the demo's "
          "step budget (stage 1 1000 steps, stage 2 250 steps, batch 4, 64 px HR crops). Quality chain columns are "
          f"on the first {rows[0]['measure_images']} RealSR sample pairs (LR 128 -> SR 512, PSNR-Y; float outputs), "
          f"the last column is the evaluate stage on all {rows[0]['eval_images']} (8-bit PNGs, pyiqa-exact PSNR-Y). "
          "No stage trains on or selects by these pairs.", "",
          f"Teacher {_fmt(rows[0]['eval_teacher'])} dB, bicubic {_fmt(rows[0]['eval_bicubic'])} dB on the "
          f"{rows[0]['eval_images']} pairs; the teacher VAE's own reconstruction (full decoder): "
          f"{_fmt(rows[0]['vae_ceiling'])} dB.", "",
          "## One seed, every variant", "",
          "| variant | decoder rec. before -> after stage 1 | feature L1 before -> after stage 2 | student vs teacher SR "
          "before -> after | student vs HR after | evaluate: student PSNR-Y | gap to teacher | s |",
          "|---|---|---|---|---|---:|---:|---:|"]
    for r in first:
        md.append(f"| {r['variant']} | {_fmt(r['decoder_before'])} -> {_fmt(r['decoder_after'])} | "
                  f"{_fmt(r['feature_l1_before'], 3)} -> {_fmt(r['feature_l1_after'], 3)} | "
                  f"{_fmt(r['psnr_student_vs_teacher_before'])} -> {_fmt(r['psnr_student_vs_teacher_after'])} | "
                  f"{_fmt(r['psnr_student_vs_hr_after'])} | {_fmt(r['eval_student'])} | "
                  f"{r['eval_student'] - r['eval_teacher']:+.2f} | {r['seconds']:.0f} |")
    md += ["", "Variants:", ""] + [f"- `{n}`: {VARIANTS[n][0]}." for n in dict.fromkeys(r["variant"] for r in first)]
    seeds = {}
    for r in rows:
        seeds.setdefault(r["variant"], []).append(r)
    multi = {n: rs for n, rs in seeds.items() if len(rs) > 1}
    if multi:
        md += ["", "## Seed noise", "",
               "The same variant with other seeds (the recipe's `seed` and both training stages' `engine.seed`: the "
               "crops' order, their degradation, the discriminator's init): mean ± standard deviation.", "",
               "| variant | seeds | student vs teacher SR after stage 2 | evaluate: student PSNR-Y | gap to teacher |",
               "|---|---|---:|---:|---:|"]
        for n, rs in multi.items():
            md.append(f"| {n} | {', '.join(str(r['seed']) for r in rs)} | "
                      f"{_mean_sd([r['psnr_student_vs_teacher_after'] for r in rs])} | "
                      f"{_mean_sd([r['eval_student'] for r in rs])} | "
                      f"{_mean_sd([r['eval_student'] - r['eval_teacher'] for r in rs])} |")
    text = "\n".join(md) + "\n"
    buf = io.StringIO()
    keys = [k for k in rows[0] if k != "environment"]
    w = csv.DictWriter(buf, fieldnames=keys + ["device", "dtype", "resolution"])
    w.writeheader()
    for r in rows:
        w.writerow({**{k: r[k] for k in keys}, "device": env.get("device"), "dtype": "fp32",
                    "resolution": "LR 128x128 -> SR 512x512"})
    from compress.io import atomic_write_text

    atomic_write_text(out.with_suffix(".md"), text)
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    return text


def merge_section(out: Path, csv_specs: list[str], title: str, command: str) -> str:
    """A ``## title`` section (one seed per variant, the same columns) from runs already made, written into
    OUT.md in place of a section of that title (or appended) and their rows into OUT.csv.

    Why: the variants of a later question run as their own command (an hour of CPU each time); their
    rows join the report without re-running the others. ``csv_specs``: FILE or FILE:VARIANT (rows
    of a run made with ``--set`` overrides, renamed to the variant that states those overrides).
    """
    rows: list[dict] = []
    for spec in csv_specs:
        file, _, rename = spec.partition(":")
        with open(file, newline="") as f:
            for r in csv.DictReader(f):
                r = {k: (v if k in ("variant", "device", "dtype", "resolution") else float(v) if v else None)
                     for k, v in r.items()}
                r["seed"] = int(r["seed"])
                if rename:
                    if rename not in VARIANTS:
                        raise SystemExit(f"error: {spec}: unknown variant {rename!r}")
                    r["variant"] = rename
                rows.append(r)
    md = [f"## {title}", "", f"`{command}` (runs: {', '.join(f'`{c}`' for c in csv_specs)}); "
          f"{rows[0]['device']}, fp32, {rows[0]['resolution']}, same columns as above.", "",
          "| variant | seed | feature L1 before -> after stage 2 | student vs teacher SR before -> after | "
          "student vs HR after | evaluate: student PSNR-Y | gap to teacher | s |", "|---|---:|---|---|---|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['seed']} | {_fmt(r['feature_l1_before'], 3)} -> "
                  f"{_fmt(r['feature_l1_after'], 3)} | {_fmt(r['psnr_student_vs_teacher_before'])} -> "
                  f"{_fmt(r['psnr_student_vs_teacher_after'])} | {_fmt(r['psnr_student_vs_hr_after'])} | "
                  f"{_fmt(r['eval_student'])} | {r['eval_student'] - r['eval_teacher']:+.2f} | {r['seconds']:.0f} |")
    md += ["", "Variants:", ""] + [f"- `{n}`: {VARIANTS[n][0]}." for n in dict.fromkeys(r["variant"] for r in rows)]
    section = "\n".join(md) + "\n"
    text = out.with_suffix(".md").read_text()
    parts = text.split("\n## ")
    kept = [parts[0]] + [p for p in parts[1:] if not p.startswith(title + "\n")]
    from compress.io import atomic_write_text

    atomic_write_text(out.with_suffix(".md"), "\n## ".join(kept).rstrip("\n") + "\n\n" + section)
    with open(out.with_suffix(".csv"), newline="") as f:
        old = list(csv.DictReader(f))
    fields = list(old[0].keys())
    new_keys = {(r["variant"], str(r["seed"])) for r in rows}
    merged = [r for r in old if (r["variant"], r["seed"]) not in new_keys] + rows
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(merged)
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python profiling/bench_recovery.py", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the two best variants (seed 0 for every variant)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides, every run")
    p.add_argument("--work", type=Path, default=Path("/tmp/adc-bench-recovery"), help="run folders")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "recovery", help="writes OUT.md and OUT.csv")
    p.add_argument("--merge", nargs="+", metavar="CSV[:VARIANT]",
                   help="no runs: put these runs' rows (CSVs this command wrote) into OUT as the section --title")
    p.add_argument("--title", default="More variants", help="the section --merge writes")
    args = p.parse_args(argv)
    command = " ".join(["python profiling/bench_recovery.py", *(sys.argv[1:] if argv is None else argv)])
    if args.merge:
        print(merge_section(args.out, args.merge, args.title, command))
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: --variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda n: run_variant(args.work, n, 0, args.set, args.keep), names))
        best = sorted(rows, key=lambda r: -r["eval_student"])[:2] if args.seeds > 1 else []
        more = [(r["variant"], s) for r in best for s in range(1, args.seeds)]
        rows += list(pool.map(lambda vs: run_variant(args.work, vs[0], vs[1], args.set, args.keep), more))
    print(write_report(rows, args.out, command, time.perf_counter() - t0, args.jobs))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
