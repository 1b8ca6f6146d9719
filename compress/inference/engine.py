"""``upscale``: padding, tiling, precision and the global colour fix around any x-scale SR model.

The model contract is the zoo's: ``forward(lr)`` with LR in [-1, 1] (B,3,h,w) -> SR in [-1, 1]
(B,3,s*h,s*w). A model with a boolean ``color_fix`` attribute (AdcSR) has it switched off while
tiles run, and the fix is applied once, on the stitched and cropped SR against the unpadded LR;
so the padded strip and the tile boundaries never enter the colour statistics.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import AdcError
from .color import match_color_
from .fp16 import keep_fp32
from .padding import model_pad_multiple, reflect_pad_to_multiple
from .precision import Precision, resolve_precision
from .tiling import Stitcher, TileGrid

logger = logging.getLogger(__name__)
Log = Callable[[str], None]


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextlib.contextmanager
def color_fix_off(model: nn.Module) -> Iterator[bool]:
    """Switch ``model.color_fix`` off for the block (restored after); yields whether it was on."""
    was = getattr(model, "color_fix", None)
    if not was:
        yield False
        return
    model.color_fix = False
    try:
        yield True
    finally:
        model.color_fix = was


def _forward_finite(model: nn.Module, tiles: torch.Tensor, prec: Precision, device: torch.device,
                    log: Log, where: str) -> tuple[torch.Tensor, Precision]:
    """One batch of tiles; rerun one precision step up while the output is not finite."""
    while True:
        with prec.autocast():
            out = model(tiles)
        if torch.isfinite(out).all():
            return out.float(), prec
        nxt = prec.fallback(device)
        if nxt is None:
            raise AdcError(f"{where}: the model output is not finite even in fp32 (broken weights?)")
        log(f"notice: {where}: {prec.name} gave non-finite values; rerunning in {nxt.name}")
        prec = nxt


def _scale_of(model: nn.Module, tiles: torch.Tensor, out: torch.Tensor) -> int:
    (h, w), (oh, ow) = tiles.shape[-2:], out.shape[-2:]
    if oh % h or ow % w or oh // h != ow // w or out.shape[0] != tiles.shape[0]:
        raise AdcError(f"model maps {tuple(tiles.shape)} to {tuple(out.shape)}: not an integer-scale SR model")
    scale = oh // h
    declared = getattr(model, "scale", None)
    if isinstance(declared, int) and declared != scale:
        raise AdcError(f"model declares scale={declared} but its output is x{scale}")
    return scale


def _run_grid(model: nn.Module, lr: torch.Tensor, grid: TileGrid, batch: int, prec: Precision,
              device: torch.device, log: Log, where: str, progress: bool) -> tuple[torch.Tensor, Precision]:
    """Run every tile of ``grid`` over the padded LR (1,3,H,W) and stitch; returns (3, s*H, s*W)."""
    from tqdm import tqdm

    boxes, dtype = grid.boxes, _param_dtype(model)
    stitcher: Stitcher | None = None
    # disable=None: shown only on a terminal, so logs and pipes get no bar lines.
    bar = tqdm(total=len(boxes), desc="tiles", unit="tile", leave=False,
               disable=None if progress and len(boxes) > 1 else True)
    try:
        for i in range(0, len(boxes), batch):
            chunk = boxes[i:i + batch]
            tiles = torch.cat([lr[:, :, y:y + grid.tile_h, x:x + grid.tile_w] for y, x in chunk])
            out, prec = _forward_finite(model, tiles.to(device, dtype), prec, device, log, where)
            if stitcher is None:
                stitcher = Stitcher(grid, _scale_of(model, tiles, out), out.shape[1], lr.device)
            for (y, x), o in zip(chunk, out):
                stitcher.add(y, x, o)
            del out
            bar.update(len(chunk))
    finally:
        bar.close()
    assert stitcher is not None
    return stitcher.result(), prec


def upscale(model: nn.Module, lr: torch.Tensor, tile: int | None = None, overlap: int = 32,
            dtype: str | torch.dtype | Precision | None = "fp32", device: str | torch.device | None = None, *,
            batch: int = 4, color_fix: bool | None = None, clamp: bool = True, progress: bool = False,
            log: Log | None = None, name: str = "image", fp32_blocks: Sequence[str] | None = None) -> torch.Tensor:
    """Super-resolve ``lr`` in [0, 1] ((3,h,w) or (B,3,h,w), any h, w) -> SR in [0, 1] (fp32, on ``lr``'s device).

    ``tile``: LR tile side in px (rounded down to the model's multiple), ``None`` or 0 = one pass;
    ``overlap``: LR px shared by neighbouring tiles (the stride is rounded to the multiple, so the
    real overlap may be larger); ``batch``: tiles per forward. ``dtype``: fp32 | bf16 | fp16
    (autocast over the model's weights; see :mod:`.precision`). ``device``: where the model runs
    (default: where its weights are; the model is moved there otherwise). ``color_fix``: apply
    AdcSR's colour match once over the whole image (default: the model's own ``color_fix``).
    The stitched image lives on ``lr``'s device, so a huge output can stay in CPU memory while
    tiles run on a GPU. ``fp32_blocks``: submodules that run in fp32 when the precision is fp16
    (their activations leave fp16's range; :func:`compress.inference.fp16.calibrate` finds them).
    """
    log = log or logger.warning
    if not isinstance(lr, torch.Tensor) or lr.dim() not in (3, 4) or lr.shape[-3] != 3 or not lr.is_floating_point():
        shape = tuple(lr.shape) if isinstance(lr, torch.Tensor) else type(lr).__name__
        raise AdcError(f"upscale: lr must be a float tensor (3,h,w) or (B,3,h,w) in [0, 1], got {shape}")
    if not isinstance(batch, int) or batch < 1:
        raise AdcError(f"upscale: batch={batch!r}, expected an int >= 1")
    single = lr.dim() == 3
    lr = lr[None] if single else lr
    dev = torch.device(device) if device is not None else model_device(model)
    if model_device(model) != dev:
        model.to(dev)
    prec = dtype if isinstance(dtype, Precision) else resolve_precision(dtype, dev)
    if prec.notice and not isinstance(dtype, Precision):
        log(prec.notice)
    multiple = model_pad_multiple(model)
    tile = tile or None  # 0 means no tiling, as on the command line
    if tile is not None:
        rounded = max(multiple, int(tile) // multiple * multiple)
        if rounded != tile:
            log(f"notice: tile {tile} rounded to {rounded} (a multiple of {multiple})")
        tile = rounded
    fix = bool(getattr(model, "color_fix", False)) if color_fix is None else bool(color_fix)

    results = []
    guard = keep_fp32(model, fp32_blocks) if fp32_blocks and prec.name == "fp16" else contextlib.nullcontext()
    with torch.no_grad(), color_fix_off(model), guard:  # not inference_mode: callers may edit the result in place
        for b in range(lr.shape[0]):
            where = name if lr.shape[0] == 1 else f"{name}[{b}]"
            x = lr[b:b + 1].float() * 2 - 1
            padded, (h, w) = reflect_pad_to_multiple(x, multiple)
            grid = TileGrid.build(padded.shape[-2], padded.shape[-1], tile, overlap, multiple)
            sr, prec = _run_grid(model, padded, grid, batch, prec, dev, log, where, progress)
            scale = sr.shape[-1] // padded.shape[-1]
            sr = sr[None, :, :h * scale, :w * scale]
            del padded
            if fix:
                match_color_(sr, x)
            sr.add_(1).mul_(0.5)
            if clamp:
                sr.clamp_(0, 1)
            results.append(sr)
    out = results[0] if len(results) == 1 else torch.cat(results)
    return out[0] if single else out
