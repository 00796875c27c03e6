"""A loss-curve PNG with no plotting library: a polyline rasterised into a small image."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

__all__ = ["plot_losses"]

W, H, PAD = 640, 360, 40


def _png(pixels: list[bytearray]) -> bytes:
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _line(px, x0, y0, x1, y1, rgb) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(steps + 1):
        x = round(x0 + (x1 - x0) * i / steps)
        y = round(y0 + (y1 - y0) * i / steps)
        for dy in (0, 1):
            if 0 <= x < W and 0 <= y + dy < H:
                px[y + dy][3 * x:3 * x + 3] = bytes(rgb)


def plot_losses(history: list[dict], path: str | Path) -> Path:
    """Training loss (blue) and validation loss (orange) against step; axes in grey."""
    px = [bytearray(b"\xff" * (3 * W)) for _ in range(H)]
    series = [([(r["step"], r["loss"]) for r in history], (31, 119, 180)),
              ([(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None],
               (255, 127, 14))]
    pts = [p for s, _ in series for p in s]
    x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    y_lo, y_hi = min(p[1] for p in pts), max(p[1] for p in pts)
    x_hi, y_hi = max(x_hi, x_lo + 1), max(y_hi, y_lo + 1e-6)

    def to_px(x: float, y: float) -> tuple[int, int]:
        return (PAD + int((x - x_lo) / (x_hi - x_lo) * (W - 2 * PAD)),
                H - PAD - int((y - y_lo) / (y_hi - y_lo) * (H - 2 * PAD)))

    _line(px, PAD, H - PAD, W - PAD, H - PAD, (128, 128, 128))
    _line(px, PAD, PAD, PAD, H - PAD, (128, 128, 128))
    for data, rgb in series:
        for a, b in zip(data, data[1:]):
            _line(px, *to_px(*a), *to_px(*b), rgb)
    path = Path(path)
    path.write_bytes(_png(px))
    return path
