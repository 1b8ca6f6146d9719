"""A PNG writer that takes the image in row bands: memory is one band, not the image.

Why our own: Pillow encodes only a whole in-memory image (16000x12000 RGB is 576 MB of uint8
on top of the float output), and pypng filters rows in pure Python (minutes for such an image).
PNG is simple to write: IHDR, then one zlib stream of rows, each prefixed by a filter byte,
cut into IDAT chunks, then IEND. Rows are filtered like libpng's default: per row, the filter
(None, Sub, Up, Average, Paeth) with the smallest sum of absolute signed bytes; all five are
computed with numpy over a whole band, since encoding only reads unfiltered bytes.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (gray, gray+alpha, RGB, RGBA)
_ROWS_PER_FILTER_CHUNK = 64


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def filter_rows(rows: np.ndarray, prev: np.ndarray | None, bpp: int) -> np.ndarray:
    """(n, W*bpp) uint8 rows -> (n, 1 + W*bpp) filtered rows, each led by its filter type byte.

    ``prev`` is the row above the first one (None for the image's first row: zeros, as PNG says).
    """
    n, width = rows.shape
    x = rows.astype(np.int16)
    up = np.empty_like(x)
    up[0] = prev.astype(np.int16) if prev is not None else 0
    up[1:] = x[:-1]
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    upleft = np.zeros_like(x)
    upleft[:, bpp:] = up[:, :-bpp]
    pa, pb, pc = np.abs(up - upleft), np.abs(left - upleft), np.abs(left + up - 2 * upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    candidates = np.stack([x, x - left, x - up, x - (left + up) // 2, x - paeth]).astype(np.uint8)  # mod 256
    cost = np.abs(candidates.view(np.int8).astype(np.int32)).sum(axis=2)  # (5, n)
    best = cost.argmin(axis=0)
    out = np.empty((n, width + 1), dtype=np.uint8)
    out[:, 0] = best
    out[:, 1:] = candidates[best, np.arange(n)]
    return out


class PngWriter:
    """Write an 8-bit PNG of ``width`` x ``height`` to ``fh``, band by band (``write(rows)``), then ``close()``.

    ``rows``: (n, width, channels) uint8. ``close`` checks that exactly ``height`` rows came.
    """

    def __init__(self, fh: BinaryIO, width: int, height: int, channels: int = 3, level: int = 6):
        if channels not in _COLOUR_TYPE or width < 1 or height < 1:
            raise ValueError(f"PngWriter: cannot write {width}x{height} with {channels} channels")
        self.fh, self.width, self.height, self.channels = fh, width, height, channels
        self.rows_written = 0
        self._prev: np.ndarray | None = None
        self._z = zlib.compressobj(level)
        ihdr = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPE[channels], 0, 0, 0)
        fh.write(_SIGNATURE + _chunk(b"IHDR", ihdr))

    def write(self, rows: np.ndarray) -> None:
        if rows.dtype != np.uint8 or rows.ndim != 3 or rows.shape[1:] != (self.width, self.channels):
            raise ValueError(f"PngWriter: expected (n, {self.width}, {self.channels}) uint8 rows, "
                             f"got {rows.shape} {rows.dtype}")
        if self.rows_written + rows.shape[0] > self.height:
            raise ValueError(f"PngWriter: more than {self.height} rows")
        flat = rows.reshape(rows.shape[0], -1)
        for r in range(0, flat.shape[0], _ROWS_PER_FILTER_CHUNK):
            part = flat[r:r + _ROWS_PER_FILTER_CHUNK]
            data = self._z.compress(filter_rows(part, self._prev, self.channels).tobytes())
            if data:
                self.fh.write(_chunk(b"IDAT", data))
            self._prev = part[-1].copy()
        self.rows_written += rows.shape[0]

    def close(self) -> None:
        if self.rows_written != self.height:
            raise ValueError(f"PngWriter: {self.rows_written} of {self.height} rows written")
        self.fh.write(_chunk(b"IDAT", self._z.flush()) + _chunk(b"IEND", b""))
