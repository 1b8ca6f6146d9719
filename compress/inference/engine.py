"""``upscale``: padding, tiling, precision and the global colour fix around any x-scale SR model.

The model contract is the zoo's: ``forward(lr)`` with LR in [-1, 1] (B,3,h,w) -> SR in [-1, 1]
(B,3,s*h,s*w). A model with a boolean ``color_fix`` attribute (AdcSR) has it switched off while
tiles run, and the fix is applied once, on the stitched and cropped SR against the unpadded LR;
so the padded strip and the tile boundaries never enter the colour statistics.

Tiles run in row-major order and are stitched one tile row at a time (:class:`BandStitcher`):
:func:`upscale` fills an output tensor from those row bands, :func:`upscale_to_png` writes them
to a PNG as they finish, so its memory is bounded by the tile row, not the image.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import AdcError
from .color import ChannelStats, ColorMap
from .fp16 import keep_fp32
from .padding import model_pad_multiple, reflect_index
from .precision import Precision, resolve_precision
from .tiling import BandStitcher, TileGrid
from ..log import get_logger

if TYPE_CHECKING:
    import numpy as np

    from ..ownership import WriteRecord

logger = get_logger(__name__)
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


class NonFiniteImage(AdcError):
    """NaN/inf in one image's LR pixels, or in the model's output for it even in fp32: that image is
    lost, the others may be fine (so :mod:`compress.sr` skips it and goes on)."""


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
            raise NonFiniteImage(f"{where}: non-finite model output even in fp32 (broken weights?)")
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


class _RunState:
    """What the tile loop learns on the way: the precision it ends in, the model's scale."""

    def __init__(self, prec: Precision):
        self.prec = prec
        self.scale: int | None = None


def _sr_bands(model: nn.Module, lr01: torch.Tensor, grid: TileGrid, multiple: int, batch: int, state: _RunState,
              device: torch.device, log: Log, where: str, progress: bool) -> Iterator[torch.Tensor]:
    """Run every tile of ``grid`` over the LR (1,3,h,w) in [0, 1], reflection-padded to ``multiple``;
    yield finished SR rows top to bottom.

    Each band is a (3, rows, s*w) fp32 view in the model's [-1, 1] scale, cropped to the LR's
    size times the scale, before any colour fix or clamp; valid until the next one is asked for
    (see :meth:`BandStitcher.stream`). Tiles are cut from the unpadded LR through the padding's
    index map and mapped to [-1, 1] one batch at a time, so no LR-sized copy is made (the values
    are exactly those of padding the whole LR and mapping it).
    """
    from tqdm import tqdm

    boxes, dtype = grid.boxes, _param_dtype(model)
    rows, cols = reflect_index(lr01.shape[-2], multiple), reflect_index(lr01.shape[-1], multiple)
    # disable=None: shown only on a terminal, so logs and pipes get no bar lines.
    bar = tqdm(total=len(boxes), desc="tiles", unit="tile", leave=False,
               disable=None if progress and len(boxes) > 1 else True)

    def cut(y: int, x: int) -> torch.Tensor:  # a tile of the reflection-padded LR, without padding it whole
        return lr01.index_select(2, rows[y:y + grid.tile_h]).index_select(3, cols[x:x + grid.tile_w])

    def batches() -> Iterator[tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]]:
        for i in range(0, len(boxes), batch):
            chunk = boxes[i:i + batch]
            tiles = torch.cat([cut(y, x) for y, x in chunk]) * 2 - 1
            out, state.prec = _forward_finite(model, tiles.to(device, dtype), state.prec, device, log, where)
            yield chunk, tiles, out
            bar.update(len(chunk))

    def tiles_of(run: Iterator[tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]]
                 ) -> Iterator[tuple[int, int, torch.Tensor]]:
        for chunk, _, out in run:
            yield from ((y, x, o) for (y, x), o in zip(chunk, out))

    try:
        run = batches()
        first = next(run)
        state.scale = _scale_of(model, first[1], first[2])
        stitcher = BandStitcher(grid, state.scale, first[2].shape[1], lr01.device,
                                crop=(lr01.shape[-2] * state.scale, lr01.shape[-1] * state.scale))
        yield from stitcher.stream(tiles_of(itertools.chain([first], run)))
    finally:
        bar.close()


class _Job:
    """One LR image, validated and padded, ready to stream: :meth:`bands`, then ``state.scale``."""

    def __init__(self, model: nn.Module, lr: torch.Tensor, tile: int | None, overlap: int,
                 dtype: str | torch.dtype | Precision | None, device: str | torch.device | None, batch: int,
                 color_fix: bool | None, log: Log, name: str, progress: bool):
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
        self.model, self.device, self.batch, self.log, self.progress = model, dev, batch, log, progress
        self.fix = bool(getattr(model, "color_fix", False)) if color_fix is None else bool(color_fix)
        self.tile, self.overlap, self.multiple, self.name = tile, overlap, multiple, name
        self.state = _RunState(prec)

    def bands(self, lr1: torch.Tensor, where: str) -> tuple[Iterator[torch.Tensor], ChannelStats | None]:
        """(SR row bands of one (1,3,h,w) LR in [0, 1], the colour statistics of the LR in [-1, 1] if
        the colour fix is on)."""
        finite = torch.isfinite(lr1)
        if not finite.all():  # else every precision fails, and the message would blame the weights
            bad = int(finite.numel() - finite.sum())
            raise NonFiniteImage(f"{where}: non-finite input pixels ({bad} NaN or inf values)")
        del finite
        ref = None
        if self.fix:
            ref = ChannelStats(lr1.shape[1])
            for r in range(0, lr1.shape[2], 256):
                ref.update(lr1[0, :, r:r + 256].float() * 2 - 1)
        h, w = lr1.shape[-2:]
        m = self.multiple
        grid = TileGrid.build(h + (-h) % m, w + (-w) % m, self.tile, self.overlap, m)
        return _sr_bands(self.model, lr1.float(), grid, m, self.batch, self.state, self.device, self.log, where,
                         self.progress), ref


def _fp32_guard(model: nn.Module, fp32_blocks: Sequence[str] | None, job: _Job):
    """Keep ``fp32_blocks`` in fp32 while the run is fp16 (nothing to keep otherwise)."""
    return keep_fp32(model, fp32_blocks) if fp32_blocks and job.state.prec.name == "fp16" else contextlib.nullcontext()


def _check_lr(lr: object, batch: object, ndims: tuple[int, ...] = (3, 4)) -> None:
    if not isinstance(lr, torch.Tensor) or lr.dim() not in ndims or lr.shape[-3] != 3 or not lr.is_floating_point():
        shape = tuple(lr.shape) if isinstance(lr, torch.Tensor) else type(lr).__name__
        want = " or ".join({3: "(3,h,w)", 4: "(B,3,h,w)"}[n] for n in ndims)
        raise AdcError(f"upscale: lr must be a float tensor {want} in [0, 1], got {shape}")
    if not isinstance(batch, int) or batch < 1:
        raise AdcError(f"upscale: batch={batch!r}, expected an int >= 1")


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
    The result lives on ``lr``'s device, so a huge output can stay in CPU memory while tiles run
    on a GPU; to bound memory by the tile instead of the image, use :func:`upscale_to_png`.
    ``fp32_blocks``: submodules that run in fp32 when the precision is fp16 (their activations
    leave fp16's range; :func:`compress.inference.fp16.calibrate` finds them).
    """
    log = log or logger.warning
    _check_lr(lr, batch)
    single = lr.dim() == 3
    lr = lr[None] if single else lr
    job = _Job(model, lr, tile, overlap, dtype, device, batch, color_fix, log, name, progress)
    results = []
    # not inference_mode: callers may edit the result in place
    with torch.no_grad(), color_fix_off(model), _fp32_guard(model, fp32_blocks, job):
        for b in range(lr.shape[0]):
            where = name if lr.shape[0] == 1 else f"{name}[{b}]"
            bands, ref = job.bands(lr[b:b + 1], where)
            sr: torch.Tensor | None = None
            stats = ChannelStats(3)
            top = 0
            for band in bands:
                if sr is None:
                    s = job.state.scale
                    sr = torch.empty(1, band.shape[0], lr.shape[-2] * s, lr.shape[-1] * s, device=lr.device)
                sr[0, :, top:top + band.shape[1]] = band
                top += band.shape[1]
                if ref is not None:
                    stats.update(band)
            assert sr is not None and top == sr.shape[-2]
            if ref is not None:
                ColorMap.between(stats, ref, where).apply_(sr[0])
            sr.add_(1).mul_(0.5)
            if clamp:
                sr.clamp_(0, 1)
            results.append(sr)
    out = results[0] if len(results) == 1 else torch.cat(results)
    return out[0] if single else out


def to_uint8_rows(band01: torch.Tensor) -> "np.ndarray":
    """(3, rows, W) in [0, 1] -> (rows, W, 3) uint8, rounding as the PNG of :func:`upscale` always did; in place."""
    return band01.mul_(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()


_CHUNK_VALUES = 1 << 22


class _Spill:
    """SR bands kept until the colour statistics are complete: in RAM up to ``ram_bytes``, else in
    an unnamed temp file in ``folder`` (O_TMPFILE: gone on close, on a crash or kill -9 too)."""

    def __init__(self, total_bytes: int, ram_bytes: int, folder: Path):
        self.on_disk = total_bytes > ram_bytes
        self.folder = folder
        self.shapes: list[tuple[int, ...]] = []
        self.ram: list[torch.Tensor] = []
        self.fh = tempfile.TemporaryFile(dir=folder, prefix=".adc-sr-spill-") if self.on_disk else None

    def append(self, band: torch.Tensor) -> None:
        """Keep a copy of ``band`` (C, rows, W), which may be a view its owner will reuse."""
        self.shapes.append(tuple(band.shape))
        if self.fh is None:
            self.ram.append(band.clone())
            return
        step = max(1, _CHUNK_VALUES // max(1, band.shape[2]))
        for c in range(band.shape[0]):  # channel-major, as a contiguous (C, rows, W) band; small copies
            for r in range(0, band.shape[1], step):
                self.fh.write(memoryview(band[c, r:r + step].contiguous().cpu().numpy()).cast("B"))

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.fh is None:
            while self.ram:
                yield self.ram.pop(0)
            return
        import numpy as np

        self.fh.flush()
        self.fh.seek(0)
        for shape in self.shapes:
            count = shape[0] * shape[1] * shape[2]
            yield torch.from_numpy(np.fromfile(self.fh, dtype=np.float32, count=count).reshape(shape))

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def upscale_to_png(model: nn.Module, lr: torch.Tensor, path: str | os.PathLike, tile: int | None = None,
                   overlap: int = 32, dtype: str | torch.dtype | Precision | None = "fp32",
                   device: str | torch.device | None = None, *, batch: int = 4, color_fix: bool | None = None,
                   progress: bool = False, log: Log | None = None, name: str = "image",
                   ram_bytes: int = 256 * 2**20, fp32_blocks: Sequence[str] | None = None,
                   alpha: torch.Tensor | None = None, record: WriteRecord | None = None) -> tuple[int, int]:
    """Super-resolve one LR (3,h,w) in [0, 1] straight into an RGB PNG at ``path``; returns (height, width).

    The pixels are exactly those of ``upscale(...)`` saved as 8-bit PNG, but memory is bounded by
    one row of tiles: finished rows are written as they come (:class:`BandStitcher`,
    :class:`~.png.PngWriter`). With the colour fix, whose statistics cover the whole image, the
    uncorrected rows wait, in RAM when the fp32 image is at most ``ram_bytes``, else in an
    unnamed temp file beside ``path`` (4 bytes per value: 2.3 GB for a 16000x12000 output), and
    are mapped and written once the statistics are complete. The PNG is written atomically;
    a failed write (disk full, ...) is one :class:`~compress.io.WriteError` line and leaves nothing.
    ``fp32_blocks``: as in :func:`upscale`. ``alpha``: the LR's (h,w) alpha in [0, 1]; it is upscaled
    bicubically (not by the model, which knows only RGB) and the PNG is RGBA. ``record``: the output
    folder's :class:`~compress.ownership.WriteRecord`; an existing file it does not list is refused, the new one entered.
    """
    from ..io import atomic_path, write_fault
    from .png import PngWriter

    log = log or logger.warning
    _check_lr(lr, batch, ndims=(3,))
    if alpha is not None and (not isinstance(alpha, torch.Tensor) or tuple(alpha.shape) != tuple(lr.shape[-2:])):
        shape = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise AdcError(f"upscale_to_png: alpha must be a tensor of the LR's size {tuple(lr.shape[-2:])}, got {shape}")
    path = Path(path)
    job = _Job(model, lr, tile, overlap, dtype, device, batch, color_fix, log, name, progress)
    with torch.no_grad(), color_fix_off(model), _fp32_guard(model, fp32_blocks, job), \
            atomic_path(path, record) as tmp, open(tmp, "wb") as fh:
        bands, ref = job.bands(lr[None], name)
        h, w = lr.shape[-2:]
        writer: PngWriter | None = None
        spill: _Spill | None = None

        def write(band: torch.Tensor, cmap: ColorMap | None) -> PngWriter:
            channels = band.shape[0] + (alpha is not None)
            out = writer or PngWriter(fh, w * job.state.scale, h * job.state.scale, channels=channels)
            if cmap is not None:
                cmap.apply_(band)
            band = band.add_(1).mul_(0.5).clamp_(0, 1)
            if alpha is not None:
                rows = _alpha_rows(alpha, job.state.scale, out.rows_written, band.shape[1])
                band = torch.cat([band, rows.to(band.device)])
            out.write(to_uint8_rows(band))
            return out

        try:
            if ref is None:
                for band in bands:
                    writer = write(band, None)
            else:
                stats = ChannelStats(3)
                for band in bands:
                    if spill is None:
                        total = 4 * band.shape[0] * h * job.state.scale * w * job.state.scale
                        spill = _Spill(total, ram_bytes, path.parent)
                    stats.update(band)
                    spill.append(band)
                del bands, band  # the stitcher's accumulator goes with the finished generator
                cmap = ColorMap.between(stats, ref, name)
                assert spill is not None
                for band in spill:
                    writer = write(band, cmap)
            assert writer is not None
            writer.close()
        except OSError as exc:
            fault = write_fault(exc, path)
            if fault is None or spill is None or not spill.on_disk:
                raise
            raise type(fault)(f"{fault} (the colour fix keeps the uncorrected image, {_gb(spill)}, in a temp file "
                              f"there until its statistics are complete)") from None
        finally:
            if spill is not None:
                spill.close()
        return writer.height, writer.width


def _alpha_rows(alpha: torch.Tensor, scale: int, top: int, rows: int) -> torch.Tensor:
    """Rows [top, top + rows) of ``alpha`` (h,w) upscaled bicubically by ``scale``, as (1, rows, s*w) in [0, 1].

    Only the LR rows those outputs read (bicubic: 2 each side) are interpolated, so memory stays one
    band, and the values are those of interpolating the whole alpha at once (same source coordinates).
    """
    lo = max(0, top // scale - 2)
    hi = min(alpha.shape[0], -(-(top + rows) // scale) + 2)
    part = torch.nn.functional.interpolate(alpha[None, None, lo:hi].float(), scale_factor=scale, mode="bicubic",
                                           align_corners=False)
    return part[0, :, top - lo * scale:top - lo * scale + rows].clamp_(0, 1)


def _gb(spill: _Spill) -> str:
    return f"{sum(4 * a * b * c for a, b, c in spill.shapes) / 1e9:.1f} GB so far"
