"""Tiny PNG charts with pillow (no plotting library in the dependency set): loss curves and
histograms for Prefect artifacts and the demo report."""

from __future__ import annotations

import base64
import io
import math
from typing import Sequence

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def line_chart(series: dict[str, Sequence[float]], title: str = "", width: int = 640, height: int = 320,
               log_y: bool = False) -> bytes:
    """PNG bytes of one or more y-series against their index (e.g. loss per step)."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 28, height - 28
    vals = [v for s in series.values() for v in s if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
    d.text((left, 6), title, fill="black")
    if not vals:
        d.text((left, height // 2), "no data", fill="gray")
        return _png(img)
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    lo, hi = f(min(vals)), f(max(vals))
    hi = hi if hi > lo else lo + 1e-9
    n = max(len(s) for s in series.values())
    d.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        v = lo + frac * (hi - lo)
        d.text((4, y - 6), f"{10 ** v:.3g}" if log_y else f"{v:.3g}", fill="black")
    d.text((right - 60, bottom + 8), f"{n} points", fill="black")
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        pts = [(left + (j / max(1, n - 1)) * (right - left), bottom - (f(v) - lo) / (hi - lo) * (bottom - top))
               for j, v in enumerate(s) if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        d.text((left + 8 + 120 * i, top + 4), name, fill=c)
    return _png(img)


def bar_chart(counts: dict[str, int], title: str = "", width: int = 640, height: int = 320) -> bytes:
    """PNG bytes of a horizontal bar chart (e.g. the bucket histogram)."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill="black")
    items = list(counts.items())[: max(1, (height - 30) // 14)]
    top = max([v for _, v in items] or [1])
    for i, (k, v) in enumerate(items):
        y = 26 + i * 14
        d.text((8, y), str(k)[:28], fill="black")
        d.rectangle([200, y + 2, 200 + (width - 260) * v / top, y + 11], fill=COLORS[0])
        d.text((206 + (width - 260) * v / top, y), str(v), fill="black")
    return _png(img)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
