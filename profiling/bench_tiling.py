"""Peak RSS and time of tiled SR on a large LR (default 2000x1500 -> 8000x6000) on CPU.

Why: AdcSR runs out of memory on a 1500x1200 LR even on an H100 untiled (AdcSR issue #7); this
shows that :func:`compress.inference.upscale` bounds memory by the tile size plus one
output-sized fp32 accumulator (3 x 8000 x 6000 x 4 B = 549 MiB), whatever the image size.

    python profiling/bench_tiling.py                         # tiny AdcSR, every tile
    python profiling/bench_tiling.py --model local           # conv-only toy: the engine's own cost
    python profiling/bench_tiling.py --model-tiles 8         # tiny AdcSR on the first 8 batches, then a stub

``--model-tiles K`` runs only the first K tile batches through the model and the rest through a
nearest-neighbour stub (same shapes; stitching and colour fix unchanged): on a shared 2-core
machine a full tiny-AdcSR pass takes tens of minutes, so the total is then *extrapolated* from
the per-batch time and labelled so. Peak RSS is the kernel's high-water mark (VmHWM, reset
before the call; see :mod:`compress.profile.latency`) and is exact either way, because the
accumulator is allocated in full and one model batch is the largest transient.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from compress.inference import TileGrid, color_fix_off, reflect_pad_to_multiple, upscale
from compress.inference.padding import model_pad_multiple

MIB = 2**20
SAMPLES = [Path(__file__).resolve().parents[1] / "data/samples/realsr/LR", Path("/work/shared/data/realsr/LR")]


def make_lr(width: int, height: int) -> torch.Tensor:
    """A (3,H,W) [0,1] LR mosaic of the RealSR sample crops (real image statistics), else noise."""
    from compress.data.images import read_image, to_chw_tensor

    files = next((sorted(d.glob("*.png")) for d in SAMPLES if d.is_dir() and any(d.glob("*.png"))), [])
    if not files:
        return torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    tiles = [to_chw_tensor(read_image(f)) for f in files]
    th, tw = tiles[0].shape[-2:]
    rows = []
    for i in range(-(-height // th)):
        rows.append(torch.cat([tiles[(i * 7 + j) % len(tiles)] for j in range(-(-width // tw))], dim=2))
    return torch.cat(rows, dim=1)[:, :height, :width].contiguous()


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "local":
        from compress.inference.toy import LocalSR

        return LocalSR().eval()
    from compress.zoo.adcsr import build_adcsr

    return build_adcsr(name)


class FirstBatchesThenStub(nn.Module):
    """The model for the first ``k`` calls, then nearest-neighbour x``scale`` (timing each model call)."""

    def __init__(self, model: nn.Module, k: int, scale: int = 4):
        super().__init__()
        self.model, self.k, self.scale = model, k, scale
        self.config = getattr(model, "config", None)
        self.color_fix = getattr(model, "color_fix", False)
        self.calls: list[float] = []
        self.stubbed = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.calls) < self.k:
            t0 = time.perf_counter()
            with color_fix_off(self.model) if not self.color_fix else contextlib.nullcontext():
                out = self.model(x)  # upscale switched our flag off: the inner model's must follow
            self.calls.append(time.perf_counter() - t0)
            return out
        self.stubbed += 1
        return nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", default="2000x1500", help="LR width x height (2000x1500)")
    p.add_argument("--model", default="tiny", choices=("tiny", "full", "local"),
                   help="tiny AdcSR (default), full AdcSR (slow on CPU), or the conv-only toy")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--model-tiles", type=int, default=0, metavar="K",
                   help="run only the first K batches through the model, stub the rest, extrapolate (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from compress.profile.latency import peak_memory

    width, height = (int(v) for v in args.lr.lower().split("x"))
    lr = make_lr(width, height)
    model = build_model(args.model)
    run_model: nn.Module = model
    if args.model_tiles:
        run_model = FirstBatchesThenStub(model, args.model_tiles)
    multiple = model_pad_multiple(model)
    padded, _ = reflect_pad_to_multiple(lr[None], multiple)
    grid = TileGrid.build(padded.shape[-2], padded.shape[-1], args.tile, args.overlap, multiple)
    n_batches = -(-len(grid) // args.batch)
    base = _rss_mib()
    print(f"LR {width}x{height} -> SR {4 * width}x{4 * height}; model {args.model} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params); tile {grid.tile_h}x{grid.tile_w}, "
          f"overlap {args.overlap}, {len(grid)} tiles in {n_batches} batches of {args.batch}; dtype {args.dtype}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    with peak_memory("cpu") as mem:
        sr = upscale(run_model, lr, tile=args.tile, overlap=args.overlap, dtype=args.dtype, batch=args.batch,
                     progress=sys.stderr.isatty(), log=lambda m: print(m, file=sys.stderr))
    wall = time.perf_counter() - t0
    assert sr.shape == (3, 4 * height, 4 * width) and torch.isfinite(sr).all()
    print(f"peak RSS {mem.peak_bytes / MIB:.0f} MiB (process before the call {base:.0f} MiB, "
          f"+{mem.delta_bytes / MIB:.0f} MiB during it; output accumulator {sr.numel() * 4 / MIB:.0f} MiB); "
          f"method: {mem.method}")
    if args.model_tiles and isinstance(run_model, FirstBatchesThenStub) and run_model.stubbed:
        timed = run_model.calls[1:] or run_model.calls  # the first call also pays one-off set-up
        per = statistics.median(timed)
        engine = wall - sum(run_model.calls)
        print(f"time: {wall:.1f} s measured with {len(run_model.calls)} of {n_batches} batches through the model "
              f"(median {per:.2f} s/batch after the first); extrapolated full run {engine + per * n_batches:.0f} s "
              f"({engine:.1f} s engine + stub, {per * n_batches:.0f} s model)")
    else:
        print(f"time: {wall:.1f} s for {len(grid)} tiles ({wall / len(grid):.2f} s/tile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
