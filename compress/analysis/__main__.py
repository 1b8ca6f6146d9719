"""``python -m compress.analysis``: classify a zoo pipeline's modules and write Markdown + CSV.

    python -m compress.analysis --model osediff --size full --lr-size 128 --prompt dropped \
        --out reports/analysis-osediff.md

Full-size models are built on ``meta`` (no memory, no weights: the analysis needs shapes and
wiring only); tiny ones on the CPU with random weights. Prints the run time and peak RSS, which
also go into the report. A user mistake (unknown model, bad option) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import AdcError


@dataclass(frozen=True)
class ModelSpec:
    """How to analyse a zoo model: its task facts and the inputs of one forward call."""

    zoo: str
    facts: Callable[[str], Any]
    inputs: Callable[[Any, int], dict]
    about: str


def _lr(model: Any, lr: int) -> dict:
    import torch

    return {"lr": torch.zeros(1, 3, lr, lr)}


def _unet_inputs(model: Any, lr: int) -> dict:
    import torch

    side = lr // 2  # the latent of an x4 SR of an lr-sized input (8x VAE downsampling)
    cad = model.config.cross_attention_dim
    return {"sample": torch.zeros(1, model.config.in_channels, side, side), "timestep": torch.tensor([999]),
            "encoder_hidden_states": torch.zeros(1, 77, cad)}


def model_specs() -> dict[str, ModelSpec]:
    from .facts import TaskFacts, osediff_facts, s3diff_facts, unet_facts

    return {
        "osediff": ModelSpec("osediff", osediff_facts, _lr, "OSEDiff: DAPE + CLIP + SD 2.1 VAE/UNet with LoRA"),
        "s3diff": ModelSpec("s3diff", s3diff_facts, _lr, "S3Diff: DEResNet + degradation-guided LoRA on SD-Turbo"),
        "adcsr": ModelSpec("adcsr", lambda p: TaskFacts(prompt=p, prompt_sources=(), prompt_encoders=(), edges=()),
                           _lr, "the AdcSR student itself"),
        "sd21-unet": ModelSpec("sd21-unet", unet_facts, _unet_inputs,
                               "a bare SD 2.1 UNet (latent = lr-size/2, timestep 999, 77 text tokens)"),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.analysis",
                                description="Classify every module of a pipeline as removable / foldable / prunable / keep.")
    p.add_argument("--model", required=True, help="zoo pipeline: " + ", ".join(model_specs()))
    p.add_argument("--size", default="full", help="full (built on meta) or tiny (built on the CPU); default full")
    p.add_argument("--lr-size", type=int, default=128, help="side of the LR input; default 128 (-> 512 SR)")
    p.add_argument("--prompt", default="dropped", help="prompt policy: dropped, fixed or variable; default dropped")
    p.add_argument("--out", required=True, help="Markdown report path")
    p.add_argument("--csv", default=None, help="per-module CSV path (default: --out with .csv)")
    p.add_argument("--no-groups", action="store_true", help="skip the torch-pruning groups")
    p.add_argument("--min-side", type=int, default=16, help="smallest side of 4-D inputs when tracing pruning groups")
    return p


def _peak_rss_gib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kb / 2**20, 2)


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    specs = model_specs()
    if args.model not in specs:
        raise AdcError(f"unknown model {args.model!r}; the analyser knows {', '.join(specs)}")
    if args.size not in ("full", "tiny"):
        raise AdcError(f"--size {args.size!r} is not one of full, tiny")
    if args.prompt not in ("dropped", "fixed", "variable"):
        raise AdcError(f"--prompt {args.prompt!r} is not one of dropped, fixed, variable")
    if args.lr_size < 8 or args.lr_size % 8:
        raise AdcError(f"--lr-size {args.lr_size} must be a positive multiple of 8")
    spec = specs[args.model]

    from ..zoo import build
    from .core import analyse
    from .report import groups_csv_path, write_report

    device = "meta" if args.size == "full" else "cpu"
    if device == "cpu":
        import torch

        torch.set_num_threads(1)  # tiny tensors: a thread pool only adds contention on a shared CPU
    model = build(spec.zoo, args.size, device)
    facts = spec.facts(args.prompt)
    inputs = spec.inputs(model, args.lr_size)
    analysis = analyse(model, facts, inputs, model=f"{args.model} ({args.size})",
                       device="meta" if device == "meta" else None, prune=not args.no_groups,
                       min_side=args.min_side)
    out = Path(args.out)
    csv = Path(args.csv) if args.csv else out.with_suffix(".csv")
    seconds = round(time.perf_counter() - t0, 1)
    analysis.info["run"] = {
        "command": "python -m compress.analysis " + " ".join(shlex.quote(a) for a in argv),
        "seconds": seconds, "process_seconds": _process_seconds(), "peak_rss_gib": _peak_rss_gib(),
        "machine": f"{platform.machine()} CPU, {_cpus()} cores visible, torch threads {_threads()}",
    }
    write_report(analysis, out, csv)
    s = analysis.summary()
    for _, r in s.iterrows():
        print(f"{r['class']:>18}: {r['params'] / 1e6:10.2f} M params ({r['params_pct']:5.1f} %)  "
              f"{r['macs'] / 1e9:10.2f} G MACs ({r['macs_pct']:5.1f} %)")
    print(f"wrote {out}, {csv}, {groups_csv_path(csv)}: {seconds} s for build + analysis + report "
          f"({_process_seconds()} s since the process started), peak RSS {_peak_rss_gib()} GiB")
    return 0


def _process_seconds() -> float | None:
    """Wall time since this process started (interpreter and imports included), if psutil is there."""
    try:
        import psutil
    except ImportError:
        return None
    return round(time.time() - psutil.Process().create_time(), 1)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except AdcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
