"""``python -m compress.deploy.fp16 MODEL --input DIR``: which blocks leave fp16's range, and a policy that keeps them fp32.

    python -m compress.deploy.fp16 weights/ --input ../shared/data/realsr/LR --policy fp16-policy.json
    python -m compress.deploy.fp16 runs/adcsr-tiny --teacher --size tiny --check --out reports/fp16-ranges.md

Runs MODEL in fp32 on real LR images with forward hooks (:func:`compress.inference.fp16.activation_ranges`)
and writes a Markdown report: per stage and per residual unit, the largest |input| and |output|;
the units above ``65504 / --safety`` (kept in fp32 by the policy); with ``--check``, every image
again under fp16 autocast without and with the policy: finite or not, and the max abs difference
to fp32 in [0, 1] output units. ``--policy FILE`` writes the policy for ``compress.sr --dtype fp16
--fp16-policy FILE``. MODEL is what ``compress.sr --model`` takes; with ``--teacher`` and a run
folder, the run's teacher (trained by it or shipped) is measured instead of its student.
Random weights say little about real activations: measure the weights you deploy.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..cli import run_cli
from ..config import float_in, int_in
from ..errors import AdcError
from ..inference.fp16 import DEFAULT_SAFETY, FP16_MAX, ModuleRange, calibrate, keep_fp32, residual_units
from ..inference.padding import model_pad_multiple
from ..io import atomic_write_text

__all__ = ["load_teacher", "load_inputs", "check_fp16", "render_report", "main"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_INPUTS = (REPO.parent / "shared" / "data" / "realsr" / "LR", REPO / "data" / "samples" / "realsr" / "LR")


def load_teacher(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The teacher of a run, as its stages loaded it: the run's family and size, with the weights its
    ``train_teacher`` stage wrote or its recipe's ``models.checkpoint`` (the demo's shipped teacher)."""
    import json

    from ..bundle import Bundle
    from ..recipe import load_recipe

    run_dir = Path(run_dir)
    resolved = run_dir / "recipe.resolved.yaml"
    if not resolved.is_file():
        raise AdcError(f"--teacher: {run_dir} is not a run folder (no recipe.resolved.yaml)")
    bundle = Bundle(load_recipe(resolved), run_dir)
    for done in sorted(run_dir.glob("[0-9][0-9]-train_teacher/DONE.json")):
        bundle.artifacts["train_teacher"] = json.loads(done.read_text())["artifacts"]
    if not bundle.has_teacher_weights():
        raise AdcError(f"--teacher: the run in {run_dir} has no teacher weights (no train_teacher stage, no "
                       "models.checkpoint, no official weights): nothing real to measure")
    return bundle.teacher().to(device).eval()


def load_inputs(folder: Path, max_images: int, crop: int, multiple: int) -> list[tuple[str, torch.Tensor]]:
    """(name, LR in [-1, 1] (1,3,h,w)) for the first ``max_images`` images, centre-cropped to ``crop`` px
    and cut down to the model's multiple."""
    from ..data.images import ImageReadError, list_images, read_image, to_chw_tensor

    if not folder.is_dir():
        raise AdcError(f"--input {folder}: no such folder")
    out = []
    for p in list_images(folder, recursive=False)[:max_images]:
        try:
            lr = to_chw_tensor(read_image(p))
        except ImageReadError:
            continue
        h, w = lr.shape[-2:]
        ch, cw = min(h, crop) // multiple * multiple, min(w, crop) // multiple * multiple
        if ch == 0 or cw == 0:
            continue
        y, x = (h - ch) // 2, (w - cw) // 2
        out.append((p.name, lr[None, :, y:y + ch, x:x + cw] * 2 - 1))
    if not out:
        raise AdcError(f"--input {folder}: no readable image of at least {multiple}x{multiple} px")
    return out


def check_fp16(model: nn.Module, inputs: Sequence[torch.Tensor], keep: Sequence[str]) -> dict[str, dict]:
    """fp16 autocast without and with ``keep`` in fp32, against fp32: finite images and max abs in [0, 1] units."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    res = {"fp16 autocast": {"finite": 0, "max_abs": 0.0}, "fp16 autocast + policy": {"finite": 0, "max_abs": 0.0}}
    with torch.no_grad():
        for x in inputs:
            x = x.to(dev)
            ref = model(x).float()
            for label, names in (("fp16 autocast", ()), ("fp16 autocast + policy", keep)):
                with keep_fp32(model, names), torch.autocast(dev.type, dtype=torch.float16):
                    out = model(x).float()
                r = res[label]
                if bool(torch.isfinite(out).all()):
                    r["finite"] += 1
                    r["max_abs"] = max(r["max_abs"], float((out - ref).abs().max()) / 2)  # [-1,1] -> [0,1] units
    for r in res.values():
        r["images"] = len(inputs)
    return res


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "inf"
    return f"{v:.3g}" if v < 1e4 else f"{v:.3e}"


def _stage(name: str) -> str:
    """The block a unit belongs to: ``unet.down_blocks.1``, ``unet.mid_block``, ``mid_block``, ``up.conv_out``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.endswith(("blocks", "layers")) and i + 1 < len(parts):
            return ".".join(parts[:i + 2])
        if part.endswith("block"):
            return ".".join(parts[:i + 1])
    return ".".join(parts[:2]) if len(parts) > 1 else name


def render_report(title: str, command: str, ranges: dict[str, ModuleRange], units: list[str], keep: list[str],
                  safety: float, images: list[str], device: str, check: dict[str, dict] | None, seconds: float) -> str:
    limit = FP16_MAX / safety
    unit_peak = {u: max((r.peak for n, r in ranges.items() if n == u or n.startswith(u + ".")), default=0.0)
                 for u in units}
    lines = [f"Generated by: `{command}` ({seconds:.0f} s)\n", f"# fp16 range of {title}\n",
             f"Activations measured in fp32 on {len(images)} LR images ({', '.join(images[:4])}"
             f"{', ...' if len(images) > 4 else ''}), {device}, batch 1, colour fix as the model has it. "
             f"fp16's largest finite value is {FP16_MAX:.0f}; the policy keeps in fp32 every residual unit whose input, "
             f"output or any internal module's output exceeds 65504 / {safety:g} = {limit:.0f}.\n"]
    over = [u for u in units if unit_peak[u] > FP16_MAX]
    lines.append(f"- Units measured: {len(units)}; above fp16's max (65504): **{len(over)}**; "
                 f"kept in fp32 by the policy (> {limit:.0f}): **{len(keep)}**.")
    peak = max(unit_peak.values(), default=0.0)
    lines.append(f"- Largest |activation| anywhere: {_fmt(peak)} "
                 f"({max(unit_peak, key=unit_peak.get) if unit_peak else '-'}).\n")
    stages: dict[str, tuple[float, float, str]] = {}
    for u in units:
        st = _stage(u)
        r = ranges.get(u)
        i, o = (r.in_max, r.out_max) if r else (0.0, 0.0)
        prev = stages.get(st, (0.0, 0.0, ""))
        stages[st] = (max(prev[0], i), max(prev[1], o), u if unit_peak[u] >= max(prev[0], prev[1]) else prev[2])
    lines.append("## Per stage (max over its units)\n")
    lines.append("| stage | max \\|input\\| | max \\|output\\| | peak unit |\n|---|---|---|---|")
    for st, (i, o, u) in stages.items():
        lines.append(f"| {st} | {_fmt(i)} | {_fmt(o)} | {u} |")
    lines.append("\n## The 15 units with the largest activations\n")
    lines.append("| unit | type | max \\|input\\| | max \\|output\\| | peak inside | fp32 under the policy |\n"
                 "|---|---|---|---|---|---|")
    for u in sorted(units, key=lambda n: -unit_peak[n])[:15]:
        r = ranges.get(u) or ModuleRange(u, "?")
        lines.append(f"| {u} | {r.kind} | {_fmt(r.in_max)} | {_fmt(r.out_max)} | {_fmt(unit_peak[u])} | "
                     f"{'yes' if u in keep else 'no'} |")
    if keep:
        lines.append(f"\nKept in fp32: {', '.join(f'`{k}`' for k in keep)}.")
    if check is not None:
        lines.append("\n## fp16 autocast against fp32\n")
        lines.append("| run | finite images | max abs vs fp32 ([0, 1] units, finite images) |\n|---|---|---|")
        for label, r in check.items():
            lines.append(f"| {label} | {r['finite']}/{r['images']} | {r['max_abs']:.2e} |")
        lines.append("\nLegend. Same images, same device; fp16 autocast = convolutions and matmuls in fp16, norms "
                     "and softmax in fp32 (torch.autocast); the policy runs the kept units with autocast off.")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.deploy.fp16", description=__doc__.split("\n")[0])
    p.add_argument("model", metavar="MODEL", help="official AdcSR weights folder, run folder, student/, or zoo name")
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--teacher", action="store_true", help="measure the run's teacher (trained or shipped) instead of its student")
    p.add_argument("--input", type=Path, default=None,
                   help="LR images (default: ../shared/data/realsr/LR, else data/samples/realsr/LR)")
    p.add_argument("--max-images", type=int_in(1, 100000), default=20)
    p.add_argument("--crop", type=int_in(16, 8192), default=128, help="centre crop side in LR px (128: RealSR's size)")
    p.add_argument("--safety", type=float_in(1.0, 1e6), default=DEFAULT_SAFETY, help="keep units above 65504 / SAFETY in fp32 (4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int_in(0, 1024), default=0)
    p.add_argument("--check", action="store_true", help="also run fp16 autocast with and without the policy")
    p.add_argument("--out", type=Path, default=None, help="Markdown report (default: print it)")
    p.add_argument("--policy", type=Path, default=None, help="write the policy JSON for compress.sr --fp16-policy")
    return p


def run(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from ..sr import load_sr_model

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_images < 1 or args.crop < 16:
        raise AdcError(f"--max-images {args.max_images} / --crop {args.crop}: expected >= 1 / >= 16")
    if args.teacher:
        model = load_teacher(args.model, args.device)
        title = f"the teacher of the run {Path(args.model).name}"
    else:
        model = load_sr_model(args.model, args.size, args.device, log=log)
        title = f"{type(model).__name__} from {args.model}" + (f" ({args.size})" if not Path(args.model).exists() else "")
    folder = args.input or next((f for f in DEFAULT_INPUTS if f.is_dir()), DEFAULT_INPUTS[-1])
    inputs = load_inputs(folder, args.max_images, args.crop, model_pad_multiple(model))
    log(f"measuring {len(inputs)} images from {folder} in fp32")
    policy, ranges = calibrate(model, [x.to(args.device) for _, x in inputs], args.safety, str(args.model))
    units, keep = residual_units(model), policy.keep_fp32
    check = check_fp16(model, [x for _, x in inputs], keep) if args.check else None
    command = "python -m compress.deploy.fp16 " + shlex.join(sys.argv[1:])
    report = render_report(title, command, ranges, units, keep, args.safety, [n for n, _ in inputs],
                           f"{args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}", check,
                           time.perf_counter() - t0)
    if args.policy:
        policy.save(args.policy)
        log(f"wrote {args.policy} ({len(policy.keep_fp32)} blocks in fp32)")
    if args.out:
        atomic_write_text(args.out, report)
        print(f"wrote {args.out}: {len(keep)} of {len(units)} units kept in fp32", flush=True)
    else:
        print(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: run(args, lambda s: print(s, file=sys.stderr, flush=True)))


if __name__ == "__main__":
    sys.exit(main())
