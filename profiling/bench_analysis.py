"""Time and peak memory of ``python -m compress.analysis`` in a fresh process.

    python profiling/bench_analysis.py                       # full-size OSEDiff, LR 128, prompt dropped
    python profiling/bench_analysis.py --model s3diff --out /tmp/a.md

Why a subprocess: the peak RSS and the wall time then include the interpreter, the imports
(torch, diffusers, transformers, peft) and the model build, as a user running the command sees
them. The budget for the full-size OSEDiff on a 2-core CPU is 60 s and 6 GiB.
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--budget-s", type=float, default=60.0)
    p.add_argument("--budget-gib", type=float, default=6.0)
    args = p.parse_args(argv)
    cmd = [sys.executable, "-m", "compress.analysis", "--model", args.model, "--size", args.size,
           "--lr-size", args.lr_size, "--prompt", args.prompt, "--out", args.out]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss_gib = usage.ru_maxrss / 2**20  # KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to other jobs on a shared CPU
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ok = wall <= args.budget_s and rss_gib <= args.budget_gib
    print(f"bench: {' '.join(cmd[1:])}")
    print(f"bench: wall {wall:.1f} s (budget {args.budget_s:.0f}), CPU {cpu:.1f} s, peak RSS {rss_gib:.2f} GiB "
          f"(budget {args.budget_gib:.0f}), {os.cpu_count()} CPUs, load average {load:.1f} -> "
          f"{'within budget' if ok else 'OVER BUDGET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
