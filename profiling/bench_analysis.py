"""Time and peak memory of ``python -m compress.analysis``, or of the weightless full recipe, in a fresh process.

    python profiling/bench_analysis.py                       # full-size OSEDiff, LR 128, prompt dropped
    python profiling/bench_analysis.py --model s3diff --out /tmp/a.md
    python profiling/bench_analysis.py --recipe recipes/adcsr.yaml   # analyse -> remove -> prune -> profile -> report

Why a subprocess: the peak RSS and the wall time then include the interpreter, the imports
(torch, diffusers, transformers, peft) and the model build, as a user running the command sees
them. Budgets on a 2-core CPU: the full-size OSEDiff analysis 30 s and 6 GiB; the weightless
``recipes/adcsr.yaml`` run (it stops for weights, exit code 3) 30 s and 4 GiB, with no weights
written (the run directory's size is printed).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import resource
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="osediff")
    p.add_argument("--size", default="full")
    p.add_argument("--lr-size", default="128")
    p.add_argument("--prompt", default="dropped")
    p.add_argument("--out", default="/tmp/bench-analysis/analysis.md")
    p.add_argument("--recipe", default=None, help="time `python -m compress.run RECIPE` instead (without weights)")
    p.add_argument("--budget-s", type=float, default=30.0)
    p.add_argument("--budget-gib", type=float, default=None, help="default: 6 (analysis), 4 (recipe)")
    args = p.parse_args(argv)
    budget_gib = args.budget_gib or (4.0 if args.recipe else 6.0)
    if args.recipe:
        import shutil
        import tempfile

        run_dir = tempfile.mkdtemp(prefix="bench-recipe-")
        shutil.rmtree(run_dir)
        cmd = [sys.executable, "-m", "compress.run", args.recipe, "--out", run_dir]
    else:
        cmd = [sys.executable, "-m", "compress.analysis", "--model", args.model, "--size", args.size,
               "--lr-size", args.lr_size, "--prompt", args.prompt, "--out", args.out]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss_gib = usage.ru_maxrss / 2**20  # KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to other jobs on a shared CPU
    sys.stdout.write(proc.stdout)
    expected = 3 if args.recipe else 0  # the weightless recipe stops for weights
    if proc.returncode != expected:
        sys.stderr.write(proc.stderr)
        return proc.returncode or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ok = wall <= args.budget_s and rss_gib <= budget_gib
    print(f"bench: {' '.join(cmd[1:])}")
    if args.recipe:
        size = sum(f.stat().st_size for f in Path(run_dir).rglob("*") if f.is_file())
        print(f"bench: run directory {size / 2**20:.2f} MiB (no weights are written without weights)")
    print(f"bench: wall {wall:.1f} s (budget {args.budget_s:.0f}), CPU {cpu:.1f} s, peak RSS {rss_gib:.2f} GiB "
          f"(budget {budget_gib:.0f}), {os.cpu_count()} CPUs, load average {load:.1f} -> "
          f"{'within budget' if ok else 'OVER BUDGET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
