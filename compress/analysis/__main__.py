"""``python -m compress.analysis``: classify a model's modules and write Markdown + CSV.

    python -m compress.analysis --model FAMILY --size full --lr-size 128 --prompt dropped --out analysis.md
    python -m compress.analysis --model FAMILY --component unet --size tiny --out unet.md

``--model``: a model family's teacher (any name in ``compress.families.available()``, plugins
included: entry points, or a module given with ``--plugin``), one of its named compressed models
(``adcsr``), or an adc run directory: its newest student, or its teacher before a student was
saved, with the run's size, prompt policy and LR size as defaults (:mod:`compress.targets`);
``--component`` analyses one part of it alone (a bare UNet called as ``unet(sample, timestep, encoder_hidden_states)``). Models
are built on ``meta`` (no memory, no weights: the analysis needs shapes and wiring only). Prints
the run time and peak RSS, which also go into the report. A user mistake (unknown model, bad
option) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import AdcError
from ..config import int_in


def _unet_inputs(unet: Any, lr: int) -> dict:
    import torch

    side = lr // 2  # the latent of an x4 SR of an lr-sized input (8x VAE downsampling)
    cad = unet.config.cross_attention_dim
    inputs = {"sample": torch.zeros(1, unet.config.in_channels, side, side), "timestep": torch.tensor([999]),
              "encoder_hidden_states": torch.zeros(1, 77, cad)}
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        width = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, width), "time_ids": torch.zeros(1, 6)}
    return inputs


def _parser() -> argparse.ArgumentParser:
    from ..cli import prog

    p = argparse.ArgumentParser(prog=prog("analyse"),
                                description="Classify every module of a pipeline as removable / foldable / prunable / keep.")
    p.add_argument("--model", required=True,
                   help="a family's teacher or a named model (adc families), or an adc run directory")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (a plugin that registers model families); repeatable")
    p.add_argument("--component", default=None, help="analyse one component of the model alone (e.g. unet)")
    p.add_argument("--size", default=None,
                   help="full or tiny widths (built on meta either way); default full, or the run's size")
    p.add_argument("--lr-size", type=int_in(8, 8192), default=None,
                   help="side of the LR input; default 128 (-> 512 SR), or the run's task.lr_size")
    p.add_argument("--prompt", default=None,
                   help="prompt policy: dropped, fixed or variable; default dropped, or the run's task.prompt")
    p.add_argument("--out", required=True, help="Markdown report path")
    p.add_argument("--csv", default=None, help="per-module CSV path (default: --out with .csv)")
    p.add_argument("--no-groups", action="store_true", help="skip the torch-pruning groups")
    p.add_argument("--min-side", type=int_in(1, 4096), default=16, help="smallest side of 4-D inputs when tracing pruning groups")
    return p


def _peak_rss_gib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kb / 2**20, 2)


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    from ..families import get
    from ..targets import resolve

    target = resolve(args.model, args.plugin)
    if target.run_dir is not None and args.size is not None and args.size != target.size:
        raise AdcError(f"--size {args.size!r}: the run {target.run_dir} is {target.size}-size")
    args.size = args.size or target.size or "full"
    args.prompt = args.prompt or target.task.get("prompt") or "dropped"
    args.lr_size = args.lr_size if args.lr_size is not None else int(target.task.get("lr_size") or 128)
    if args.size not in ("full", "tiny"):
        raise AdcError(f"--size {args.size!r} is not one of full, tiny")
    if args.prompt not in ("dropped", "fixed", "variable"):
        raise AdcError(f"--prompt {args.prompt!r} is not one of dropped, fixed, variable")
    if args.lr_size < 8 or args.lr_size % 8:
        raise AdcError(f"--lr-size {args.lr_size} must be a positive multiple of 8")

    from .core import analyse
    from .facts import TaskFacts, unet_facts
    from .report import groups_csv_path, write_report

    model = target.build(args.size, "meta")
    kind = target.kind
    family = get(target.family)
    call = getattr(family, "analysis_call", None) if kind == "teacher" else None
    if args.component:
        comps = model.components() if hasattr(model, "components") else dict(model.named_children())
        if args.component not in comps:
            raise AdcError(f"--component {args.component!r}: {args.model} has {', '.join(comps)}")
        model, call = comps[args.component], None
        facts, inputs = unet_facts(args.prompt), _unet_inputs(model, args.lr_size)
    elif kind == "teacher":
        facts, inputs = family.facts(args.prompt, 999), family.example_inputs(args.lr_size, "meta", model)
    else:  # a compressed model: nothing left to drop but what it keeps
        import torch

        facts = TaskFacts(prompt=args.prompt, prompt_sources=(), prompt_encoders=(), edges=())
        inputs = ({"lr": torch.zeros(1, 3, args.lr_size, args.lr_size, device="meta")}  # a run's AdcSR-style student
                  if target.student_dir is not None else family.example_inputs(args.lr_size, "meta"))
    name = f"{target.label}.{args.component}" if args.component else target.label
    analysis = analyse(model, facts, inputs, model=f"{name} ({args.size})", device="meta",
                       prune=not args.no_groups, min_side=args.min_side,
                       call=(lambda m, **kw: call(m, **kw)) if call else None)
    out = Path(args.out)
    csv = Path(args.csv) if args.csv else out.with_suffix(".csv")
    seconds = round(time.perf_counter() - t0, 1)
    analysis.info["run"] = {
        "command": f"{_parser().prog} " + " ".join(shlex.quote(a) for a in argv),
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
    from ..cli import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
