"""Tile grids and blend windows for tiled super-resolution.

Why: AdcSR's first UNet level self-attends over every unshuffled pixel and its decoder runs at
4x the LR size, so a 1500x1200 LR does not fit even an H100 in one pass (AdcSR issue #7).
Tiles bound memory by the tile size. Seams are avoided by overlapping tiles and blending their
outputs with a window that, across each shared band, (1) gives a tile's outermost quarter
weight 0 (those pixels saw zero padding and the least context), (2) cross-fades over the middle
half with a raised cosine, (3) stays 1 on image borders, where there is no neighbour.

Because every tile of a grid row shares its vertical window and every tile of a column its
horizontal one, the sum of all windows is separable, ``Wy(y) * Wx(x)``: stitching needs one
output-sized accumulator and two 1-D normalisers, not a second output-sized weight map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from ..errors import AdcError


def axis_starts(length: int, tile: int, overlap: int, multiple: int) -> list[int]:
    """Tile starts along one padded axis: multiples of ``multiple`` (so the UNet's downsampling
    grid lines up with the untiled run), stride ``<= tile - overlap``, the last tile flush with the end."""
    if tile >= length:
        return [0]
    stride = max(multiple, (tile - overlap) // multiple * multiple)  # so the real overlap is >= ``overlap``
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """Tiles over a padded LR of ``height`` x ``width``: every tile is ``tile_h`` x ``tile_w``."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @classmethod
    def build(cls, height: int, width: int, tile: int | None, overlap: int, multiple: int) -> "TileGrid":
        """``tile=None`` (or a tile as large as the image) gives one tile covering everything."""
        if height % multiple or width % multiple:
            raise AdcError(f"internal: padded size {height}x{width} is not a multiple of {multiple}")
        if tile is None:
            return cls(height, width, height, width, overlap, (0,), (0,))
        if tile < multiple or tile % multiple:
            raise AdcError(f"tile {tile} must be a positive multiple of {multiple} for this model")
        if overlap < 0 or overlap >= tile:
            raise AdcError(f"overlap {overlap} must be >= 0 and smaller than the tile ({tile})")
        if tile - overlap < multiple:
            raise AdcError(f"tile {tile} with overlap {overlap} leaves a stride under {multiple} (the model's "
                           f"multiple); use a tile of at least {overlap + multiple} or a smaller overlap")
        th, tw = min(tile, height), min(tile, width)
        return cls(height, width, th, tw, overlap, tuple(axis_starts(height, th, overlap, multiple)),
                   tuple(axis_starts(width, tw, overlap, multiple)))

    @property
    def boxes(self) -> list[tuple[int, int]]:
        """(y, x) of every tile, row-major."""
        return [(y, x) for y in self.ys for x in self.xs]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)


def ramp(n_out: int, band: int, margin_frac: float = 0.25) -> torch.Tensor:
    """Weights rising from an edge over ``n_out`` pixels: 0 over the first ``margin_frac`` of
    ``band``, raised cosine over the next ``1 - 2 * margin_frac``, then 1. Sampled at pixel centres,
    so the rising part is strictly positive."""
    dead = int(round(band * margin_frac))
    rise = max(band - 2 * dead, 0)
    w = torch.ones(n_out, dtype=torch.float64)
    w[:min(dead, n_out)] = 0.0
    if rise:
        t = (torch.arange(rise, dtype=torch.float64) + 0.5) / rise
        seg = 0.5 - 0.5 * torch.cos(math.pi * t)
        end = min(dead + rise, n_out)
        w[dead:end] = seg[:end - dead]
    return w


def axis_window(start: int, size: int, length: int, overlap: int, scale: int) -> torch.Tensor:
    """Output-space window (``size * scale`` long) of the tile at ``start`` on an axis of ``length``:
    ramps only on sides that have a neighbouring tile."""
    n, band = size * scale, overlap * scale
    w = torch.ones(n, dtype=torch.float64)
    if start > 0:
        w = w * ramp(n, band)
    if start + size < length:
        w = w * ramp(n, band).flip(0)
    return w


class _Windows:
    """The blend windows of every tile row and column of ``grid``, and their per-axis sums."""

    def __init__(self, grid: TileGrid, scale: int):
        self.grid, self.scale = grid, scale
        g, s = grid, scale
        self._wy = {y: axis_window(y, g.tile_h, g.height, g.overlap, s) for y in g.ys}
        self._wx = {x: axis_window(x, g.tile_w, g.width, g.overlap, s) for x in g.xs}
        norm_y = torch.zeros(g.height * s, dtype=torch.float64)
        norm_x = torch.zeros(g.width * s, dtype=torch.float64)
        for y, w in self._wy.items():
            norm_y[y * s:(y + g.tile_h) * s] += w
        for x, w in self._wx.items():
            norm_x[x * s:(x + g.tile_w) * s] += w
        if (norm_y <= 0).any() or (norm_x <= 0).any():
            raise AdcError("internal: the tile windows leave output pixels with zero weight")
        self._norm_y, self._norm_x = norm_y, norm_x

    def _add(self, acc: torch.Tensor, top: int, y: int, x: int, out: torch.Tensor) -> None:
        """Add one tile's weighted output into ``acc``, whose row 0 is output row ``top``."""
        s, g = self.scale, self.grid
        w = (self._wy[y][:, None] * self._wx[x][None, :]).to(acc.device, torch.float32)
        region = acc[:, y * s - top:(y + g.tile_h) * s - top, x * s:(x + g.tile_w) * s]
        region.addcmul_(out.to(acc.device, torch.float32), w)

    def _normalise_(self, rows: torch.Tensor, top: int) -> torch.Tensor:
        """Divide accumulated output rows ``top:top + len`` by the window sums, in place."""
        dev = rows.device
        rows.div_(self._norm_y[top:top + rows.shape[1]].to(dev, torch.float32)[None, :, None])
        rows.div_(self._norm_x.to(dev, torch.float32)[None, None, :])
        return rows


class Stitcher(_Windows):
    """Accumulates window-weighted tile outputs into one (C, H*s, W*s) fp32 image."""

    def __init__(self, grid: TileGrid, scale: int, channels: int, device: torch.device | str):
        super().__init__(grid, scale)
        self.acc = torch.zeros(channels, grid.height * scale, grid.width * scale, dtype=torch.float32, device=device)

    def add(self, y: int, x: int, out: torch.Tensor) -> None:
        """Add one tile's output (C, tile_h*s, tile_w*s)."""
        self._add(self.acc, 0, y, x, out)

    def result(self) -> torch.Tensor:
        """The normalised image, in place (no second output-sized buffer)."""
        return self._normalise_(self.acc, 0)


class BandStitcher(_Windows):
    """Stitches tiles given in row-major order, holding only one tile row of output.

    Why: the whole output of a 4000x3000 LR is 2.3 GB in fp32. Tiles arrive row by row, and once
    the first tile of grid row ``y`` arrives, every output row above ``y * scale`` has all its
    contributions: :meth:`stream` yields those rows (normalised, cropped to ``crop``) and the
    accumulator then keeps only the rows still shared with the next tile row. Memory is one tile
    row, ``C x tile_h*s x W*s``, whatever the image height; the arithmetic per pixel is
    :class:`Stitcher`'s, so the bands concatenate to exactly its result.
    """

    def __init__(self, grid: TileGrid, scale: int, channels: int, device: torch.device | str,
                 crop: tuple[int, int] | None = None):
        super().__init__(grid, scale)
        self.rows = grid.tile_h * scale
        self.out_h, self.out_w = crop or (grid.height * scale, grid.width * scale)
        self.acc = torch.zeros(channels, self.rows, grid.width * scale, dtype=torch.float32, device=device)
        self.top = 0  # output row held in acc[:, 0]

    def stream(self, tiles: Iterable[tuple[int, int, torch.Tensor]]) -> Iterator[torch.Tensor]:
        """Add ``(y, x, output)`` tiles in row-major order; yield finished (C, rows, out_w) bands.

        A band is a *view* into the accumulator, valid until the next band is asked for (the
        consumer may change it in place; keep a copy to keep it). No copy of it is made here.
        """
        s = self.scale
        for y, x, out in tiles:
            if y * s > self.top:
                yield from self._finished(y * s)
            self._add(self.acc, self.top, y, x, out)
        yield from self._finished(self.grid.height * s)

    def _finished(self, upto: int) -> Iterator[torch.Tensor]:
        n = upto - self.top
        rows = self._normalise_(self.acc[:, :n], self.top)
        keep = max(0, min(upto, self.out_h) - self.top)
        if keep:
            yield rows[:, :keep, :self.out_w]
        held = self.rows - n
        if held > 0:
            self.acc[:, :held] = self.acc[:, n:].clone()
        self.acc[:, max(held, 0):].zero_()
        self.top = upto
