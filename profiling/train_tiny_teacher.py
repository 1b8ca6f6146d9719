"""Train the tiny OSEDiff teacher that the offline demo ships with, and write its record.

    python profiling/train_tiny_teacher.py --hr DIR/BSD100 DIR/Urban100

1. cuts the HR images into 256 px tiles (a random crop then decodes a small PNG, not a 1024 px one);
2. runs ``recipes/osediff-tiny-teacher.yaml`` (the library's ``train_teacher`` stage, then
   ``evaluate`` on the RealSR sample pairs, which it never trains on);
3. writes the weights in fp16 to ``data/teachers/osediff-tiny.safetensors`` (the fp32 copy stays
   in the run folder) and a record beside them (``osediff-tiny.json``): the command, the data,
   steps, seed, wall time, hardware and the held-out PSNR/SSIM of the shipped (fp16-rounded)
   weights against bicubic, on the sample pairs and, with ``--eval-lr/--eval-hr``, on more.

``--resume`` continues an interrupted run from its last checkpoint.
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

RECIPE = REPO / "recipes" / "osediff-tiny-teacher.yaml"
OUT = REPO / "data" / "teachers" / "osediff-tiny.safetensors"
TILE = 256


def training_time(metrics_csv: Path) -> dict:
    """Training time summed over the logged intervals (steps / steps_per_s of each ``metrics.csv`` row):
    unlike the stage's own time it also counts the part before a ``--resume``, and no time between."""
    import pandas as pd

    m = pd.read_csv(metrics_csv)
    per_interval = m["step"].diff().fillna(m["step"].iloc[0]) / m["steps_per_s"]
    return {"train_time_s": round(float(per_interval.sum())),
            "steps_per_s_median": round(float(m["steps_per_s"].median()), 3)}


def cut_tiles(folders: list[Path], out: Path, tile: int = TILE) -> int:
    """Every HR image cut into non-overlapping ``tile`` px squares (the remainder dropped); returns the count."""
    from PIL import Image

    from compress.metrics.images import list_images

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for folder in folders:
        for path in list_images(folder, "HR"):
            img = Image.open(path).convert("RGB")
            w, h = img.size
            for y in range(0, h - tile + 1, tile):
                for x in range(0, w - tile + 1, tile):
                    dst = out / f"{folder.name}_{path.stem}_{y}_{x}.png"
                    if not dst.exists():
                        img.crop((x, y, x + tile, y + tile)).save(dst, compress_level=1)
                    n += 1
    return n


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def evaluate_shipped(weights: Path, lr_dir: Path, hr_dir: Path) -> dict:
    """PSNR/SSIM (Y) of bicubic and of the teacher with ``weights``, as the recipe's evaluate stage scores them."""
    import tempfile

    import torch
    import torch.nn.functional as F

    from compress.data import PairedFolderDataset
    from compress.evaluate import evaluate_folders
    from compress.families import get
    from compress.io import load_safetensors
    from compress.stages.evaluate import _save_png

    family = get("osediff")
    teacher = family.build_teacher("tiny", "cpu")
    teacher.load_state_dict({k: v.float() for k, v in load_safetensors(weights).items()})
    teacher.eval().requires_grad_(False)
    pairs = PairedFolderDataset(lr_dir, hr_dir, scale=4)
    scores = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        root = Path(tmp)
        for i in range(len(pairs)):
            item = pairs[i]
            lr = item["lr"][None]
            _save_png(item["hr"], root / "HR" / f"{item['name']}.png")
            _save_png(F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)[0],
                      root / "bicubic" / f"{item['name']}.png")
            _save_png(family.evaluate_teacher(teacher, lr)[0], root / "teacher" / f"{item['name']}.png")
        for method in ("bicubic", "teacher"):
            frame = evaluate_folders(root / method, root / "HR", metrics=["psnr", "ssim"])
            scores[method] = {"psnr": round(float(frame["psnr"].mean()), 4), "ssim": round(float(frame["ssim"].mean()), 4)}
    scores["pairs"] = len(pairs)
    return scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hr", type=Path, nargs="+", required=True, help="HR image folders (BSD100, Urban100)")
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "osediff-tiny-teacher")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    ap.add_argument("--eval-lr", type=Path, help="more held-out pairs for the record (e.g. the 100 RealSR pairs)")
    ap.add_argument("--eval-hr", type=Path)
    args = ap.parse_args()
    for folder in args.hr:
        if not folder.is_dir():
            raise SystemExit(f"error: --hr {folder}: not a folder")
    tiles = args.run_dir.parent / f"{args.run_dir.name}-hr-tiles"
    n_tiles = cut_tiles(args.hr, tiles)
    print(f"{n_tiles} HR tiles of {TILE} px in {tiles}", flush=True)
    cmd = [sys.executable, "-m", "compress.run", str(RECIPE), "--out", str(args.run_dir),
           "--set", f"data.train_hr=[{tiles}]"] + [a for s in args.set for a in ("--set", s)]
    if args.resume:
        cmd.append("--resume")
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0:
        return rc
    wall = time.time() - t0

    import torch

    from compress.io import load_safetensors, save_safetensors

    done = json.loads((args.run_dir / "00-train_teacher" / "DONE.json").read_text())
    weights = args.run_dir / done["artifacts"]["weights"]  # artifacts are relative to the run directory
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in load_safetensors(weights).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, args.out)
    held_out = {"sample": evaluate_shipped(args.out, REPO / "data/samples/realsr/LR", REPO / "data/samples/realsr/HR")}
    if args.eval_lr and args.eval_hr:
        held_out["extra"] = {"lr": args.eval_lr.name, **evaluate_shipped(args.out, args.eval_lr, args.eval_hr)}
    import compress

    record = {
        "weights": args.out.name,
        "dtype": "float16 (trained in fp32; the fp32 copy is the run's 00-train_teacher/teacher.safetensors)",
        "size_mb": round(args.out.stat().st_size / 1e6, 2),
        "params": sum(v.numel() for v in state.values()),
        "command": "python profiling/train_tiny_teacher.py " + " ".join(
            ["--hr"] + [f"DIR/{p.name}" for p in args.hr] + [f"--set {shlex.quote(s)}" for s in args.set]),
        "recipe": str(RECIPE.relative_to(REPO)),
        "data": {"folders": [p.name for p in args.hr],
                 "source": "github.com/jbhuang0604/SelfExSR data/{BSD100,Urban100}/image_SRF_4/*_HR.png",
                 "images": sum(len(list(p.glob('*.png'))) for p in args.hr), "tiles": n_tiles, "tile_px": TILE},
        "steps": done["artifacts"]["steps"],
        "seed": 0,
        **training_time(args.run_dir / "00-train_teacher" / "metrics.csv"),
        "wall_time_s_this_call": round(wall),
        "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": 1, "device": "cpu",
                     "torch": torch.__version__, "python": platform.python_version(), "adc": compress.__version__},
        "held_out_eval": held_out,
        "eval_protocol": "OSEDiff's test path (PIL bicubic x4, sampled latent seeded 42, AdaIN colour fix); "
                         "PSNR/SSIM on Y, pyiqa-exact, no border crop",
    }
    (args.out.with_suffix(".json")).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
