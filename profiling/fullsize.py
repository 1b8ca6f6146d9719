"""The full-size proof: ``recipes/adcsr.yaml`` at full width on synthetic weights, and its memory levers.

    python profiling/fullsize.py --weights /tmp/adc-weights --work /tmp/adc-fullsize   # writes reports/fullsize.md
    python profiling/fullsize.py ... --levers --crops 256 512                          # + one distill step per lever

1. Writes random weights in every official layout (``profiling/synthetic_weights.py``, skipped
   when ``--weights`` already holds them).
2. Runs every stage of ``recipes/adcsr.yaml`` with those files for ``--steps`` training steps at
   ``--crop`` (batch 1), in a fresh process: each stage's ``DONE.json`` has its time, its own
   peak memory (anonymous memory peak and rise; CUDA max allocated on a GPU) and its disk.
3. ``--levers``: for each memory lever of stage 2 and each crop, a fresh run of remove -> prune ->
   distill (1 step) measures the training loop's peak memory (the engine's ``summary.json``).
4. Writes ``reports/fullsize.md``. This is how a change to the real path is checked (slow: tens of
   minutes on a CPU; the test ``tests/test_fullsize.py`` runs it, marked slow).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LEVERS = {
    "official (fp32 frozen, Adam)": [],
    "frozen teacher/DAPE/text encoder in bf16": ["stages.distill.frozen_dtype=bf16"],
    "gradient checkpointing (student + D)": ["stages.distill.engine.gradient_checkpointing=true"],
    "8-bit Adam (bitsandbytes)": ["stages.distill.optimizer=adam8bit"],
    "bf16 frozen + checkpointing (+ 8-bit Adam when installed)": ["stages.distill.frozen_dtype=bf16",
                                                                 "stages.distill.engine.gradient_checkpointing=true"],
}


def _weights_args(w: dict[str, Path]) -> list[str]:
    out = []
    for key in ("sd21_base", "osediff", "ram", "dape", "ram_tag_list"):
        out += ["--set", f"models.weights.{key}={w[key]}"]
    out += ["--set", f"data.train_hr=[{w['train_hr']}]", "--set", f"data.eval_lr={w['eval_lr']}",
            "--set", f"data.eval_hr={w['eval_hr']}", "--set", "data.eval_limit=1"]
    return out


def _run(args: list[str], log) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "compress.run", str(REPO / "recipes" / "adcsr.yaml"), *args]
    log("$ " + " ".join(shlex.quote(a) for a in cmd[1:]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return proc.returncode, time.perf_counter() - t0, proc.stdout + proc.stderr


def _training(crop: int, steps: int, batch: int = 1) -> list[str]:
    out = []
    for stage in ("pretrain_decoder", "distill"):
        out += ["--set", f"stages.{stage}.crop={crop}", "--set", f"stages.{stage}.engine.max_steps={steps}",
                "--set", f"stages.{stage}.engine.batch_size={batch}",
                "--set", f"stages.{stage}.engine.checkpoint_every={steps}"]
    return out + ["--set", "stages.pretrain_decoder.lpips_weight=0", "--set", "stages.evaluate.metrics=[psnr,ssim]",
                  "--set", "stages.profile.latency=off"]


def _stages(run: Path) -> list[dict]:
    rows = []
    for done in sorted(run.glob("*/DONE.json")):
        d = json.loads(done.read_text())
        rows.append({"stage": d["stage"], "seconds": d["seconds"], **d.get("memory", {}), "disk_mib": d.get("disk_mib")})
    return rows


def _disk(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=Path("/tmp/adc-weights"))
    p.add_argument("--work", type=Path, default=Path("/tmp/adc-fullsize"))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --work (finished stages are kept, with their times)")
    p.add_argument("--levers", action="store_true")
    p.add_argument("--crops", type=int, nargs="+", default=[256, 512])
    p.add_argument("--lever", action="append", default=[], metavar="TEXT",
                   help="only the levers whose name contains TEXT (repeatable; default: all)")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "fullsize.md")
    args = p.parse_args(argv)
    log = print
    from profiling.synthetic_weights import write_all

    t0 = time.perf_counter()
    w = write_all(args.weights, "full", log=log)
    write_s = time.perf_counter() - t0
    import shutil

    run = args.work / "run"
    if not args.resume:
        shutil.rmtree(run, ignore_errors=True)
    rc, _, out = _run(["--out", str(run), *(["--resume"] if args.resume else []), *_weights_args(w),
                             *_training(args.crop, args.steps)], log)
    if rc != 0:
        sys.stderr.write(out[-4000:])
        return rc
    stage_rows = _stages(run)
    seconds = sum(r["seconds"] for r in stage_rows)  # the stages' own times, also across a resumed run
    lever_rows = []
    if args.levers:
        main_summary = next(iter(run.glob("*-distill/summary.json")), None)
        if main_summary is not None:  # the official settings, as the main run's stage 2 measured them
            lever_rows.append(_lever_row("official (fp32 frozen, Adam): the main run's stage 2", args.crop,
                                         json.loads(main_summary.read_text()), f"{args.steps} steps"))
        try:
            import bitsandbytes  # noqa: F401

            has_bnb = True
        except Exception:  # not installed, or no kernels for this platform
            has_bnb = False
        for crop in args.crops:
            for name, sets in LEVERS.items():
                if args.lever and not any(t in name for t in args.lever):
                    continue
                if "adam8bit" in " ".join(sets) and not has_bnb:
                    lever_rows.append({"lever": name, "crop": crop, "status": "not run: bitsandbytes is not installed"})
                    continue
                if "8-bit" in name and has_bnb:
                    sets = sets + ["stages.distill.optimizer=adam8bit"]
                lr = args.work / f"lever-{crop}-{len(lever_rows)}"
                shutil.rmtree(lr, ignore_errors=True)
                extra = [a for s in sets for a in ("--set", s)]
                rc, sec, out = _run(["--out", str(lr), "--stages", "remove,prune,distill", *_weights_args(w),
                                     *_training(crop, 1), *extra], log)
                summary = next(iter(lr.glob("*-distill/summary.json")), lr / "missing")
                if rc != 0 or not summary.is_file():
                    lever_rows.append({"lever": name, "crop": crop, "status": f"failed: {out.strip().splitlines()[-1][:160]}"})
                    continue
                lever_rows.append(_lever_row(name, crop, json.loads(summary.read_text()), "ok"))
                shutil.rmtree(lr, ignore_errors=True)
    write_report(args, stage_rows, lever_rows, seconds, write_s, _disk(run), run)
    log(f"wrote {args.out}")
    return 0


def _lever_row(name: str, crop: int, summary: dict, status: str) -> dict:
    m = summary["memory"]
    return {"lever": name, "crop": crop, "status": status, "step_s": summary["seconds"] / max(1, summary["steps_this_run"]),
            "peak_anon_gib": m["peak_anon_mib"] / 1024, "peak_rss_gib": m["peak_rss_mib"] / 1024,
            "cuda_gib": (m["cuda_max_allocated_mib"] or 0) / 1024 or None}


def write_report(args, stages: list[dict], levers: list[dict], seconds: float, write_s: float, disk_mib: float,
                 run: Path) -> None:
    from compress.io import atomic_write_text

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or 'x86-64'} CPU"
    cmd = "python profiling/fullsize.py " + " ".join(
        a for a in (f"--steps {args.steps}", f"--crop {args.crop}", "--resume" if args.resume else "",
                    "--levers" if args.levers else "",
                    "--crops " + " ".join(map(str, args.crops)) if args.levers else "",
                    *(f"--lever {shlex.quote(t)}" for t in args.lever)) if a)
    L = ["# Full-size proof: `recipes/adcsr.yaml` on synthetic weights", "",
         f"Made by `{cmd}` on {device}, torch {torch.__version__}, {os.cpu_count()} CPUs, fp32. Synthetic "
         "weights in every official layout (`profiling/synthetic_weights.py`: SD 2.1-base diffusers folder with "
         "tokenizer, `osediff.pkl`, RAM + DAPE, tag list; random values): every loader and the whole real-weight "
         f"path run at full width ({args.steps} training steps per stage, batch 1, {args.crop} px HR crops, 1 eval "
         "image). Wall times are from a shared 2-core machine." + (
             " The run was interrupted and continued with `--resume`: the finished stages kept their "
             "`DONE.json` (time, memory, disk) and the others ran in the new process." if args.resume else ""), "",
         "## Stages", "",
         f"Whole run: {seconds:.0f} s (sum of the stages); run directory {disk_mib / 1024:.2f} GiB (checkpoints hold only what trains; "
         f"one kept per stage); writing the synthetic weights took {write_s:.0f} s (not a stage).", "",
         "| stage | time (s) | peak anonymous memory (GiB) | rise in the stage (GiB) | peak RSS (GiB) | disk (MiB) |",
         "|---|---|---|---|---|---|"]
    for r in stages:
        L.append(f"| {r['stage']} | {r['seconds']:.0f} | {r.get('peak_anon_mib', 0) / 1024:.2f} | "
                 f"{r.get('anon_rise_mib', 0) / 1024:.2f} | {r.get('peak_rss_mib', 0) / 1024:.2f} | {r['disk_mib']} |")
    L += ["", "Anonymous memory is what the process holds (`RssAnon`, sampled every 50 ms): unlike RSS it does not "
          "count file pages mapped from safetensors, and unlike the process's lifetime peak it is measured per stage.", ""]
    if levers:
        L += ["## Memory levers of stage 2 (one training step, batch 1)", "",
              "Each lever row is a fresh run of remove -> prune -> distill with one step; the first row is the "
              "main run's stage 2 (official settings). Memory is the training loop's, from the engine's "
              "`summary.json`: CUDA max allocated on a GPU; on a CPU the peak anonymous memory and the peak RSS. "
              "On a CPU both matter: fp32 weights are read from memory-mapped safetensors (file pages, in RSS "
              "only), while a weight cast to bf16 is a new anonymous copy at half the size, so a bf16 lever can "
              "raise the anonymous peak while it lowers what the process holds in all (RSS). Step times come from "
              "a shared machine under different loads: compare the memory, not the times.", "",
              "| lever | HR crop | time per step (s) | peak anonymous / CUDA (GiB) | peak RSS (GiB) | status |",
              "|---|---|---|---|---|---|"]
        for r in levers:
            mem = r.get("cuda_gib") or r.get("peak_anon_gib")
            rss = r.get("peak_rss_gib")
            L.append(f"| {r['lever']} | {r['crop']} | {r.get('step_s', 0):.0f} | "
                     f"{'–' if mem is None else f'{mem:.2f}'} | {'–' if rss is None else f'{rss:.2f}'} | {r['status']} |")
        L.append("")
    else:
        L += ["## Memory levers of stage 2", "", "Not measured in this report: `--levers` runs remove -> prune -> "
              "distill once per lever and crop (about 15 min per run on a 2-core CPU at 256 px).", ""]
    atomic_write_text(args.out, "\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
