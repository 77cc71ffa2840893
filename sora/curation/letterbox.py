"""Black bars (letterbox, pillarbox, windowbox) -> the box of the real picture.

A row (column) is a bar when it is dark in every sampled frame: its 90th-percentile luma stays
at or below `threshold` (on 0..255, the level FFmpeg's `cropdetect` filter uses by default).
Bars are the dark runs touching the edges; the content box is what lies between them. Using
several frames of one shot keeps a dark scene from being cut: a row must be dark in all of them.

A bar also needs a picture edge beside it: the first line inside it must be mostly lit
(`min_fill` of its pixels above the threshold in some frame). An object moving over a black
background leaves dark rows above and below it too, but the line next to them is mostly
background, so nothing is cropped.
"""

from __future__ import annotations

import math

import numpy as np

# ITU-R BT.601 luma weights (what "black" means for a decoded RGB frame).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _edge_runs(dark: np.ndarray) -> tuple[int, int]:
    """Lengths of the runs of True at the start and at the end of a 1-D bool array."""
    n = len(dark)
    lead = n if dark.all() else int(np.argmin(dark))
    trail = n if dark.all() else int(np.argmin(dark[::-1]))
    return lead, trail


def content_box(frames: np.ndarray, threshold: float = 24.0, min_bar: float = 0.01,
                max_bar: float = 0.4, min_fill: float = 0.6) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels of `frames` (T, H, W, 3) uint8: the picture inside black bars.

    A bar thinner than `min_bar` of its side is ignored (a dark edge line, not a bar); when the
    bars would take more than `max_bar` of a side per edge (a black or fading frame), that
    axis is left uncropped; a bar whose inner neighbour line is lit in less than `min_fill` of
    its pixels is no bar (see the module docstring).
    """
    frames = np.asarray(frames)
    assert frames.ndim == 4 and frames.shape[-1] == 3 and len(frames), \
        f"frames must be (T, H, W, 3) with T >= 1, got {frames.shape}"
    T, H, W, _ = frames.shape
    luma = frames.astype(np.float32) @ _LUMA  # (T, H, W)
    rows = np.percentile(luma, 90, axis=2).max(axis=0)  # (H,) brightest over time
    cols = np.percentile(luma, 90, axis=1).max(axis=0)  # (W,)
    lit = luma > threshold  # (T, H, W)
    box = []
    for level, size, axis in ((cols, W, 2), (rows, H, 1)):
        lead, trail = _edge_runs(level <= threshold)
        if max(lead, trail) > max_bar * size:
            lead = trail = 0

        def is_bar(length: int, inner: int) -> bool:
            if length < max(1, min_bar * size):
                return False
            line = np.take(lit, min(max(inner, 0), size - 1), axis=axis)  # (T, other side)
            return float(line.mean(axis=1).max()) >= min_fill

        lead = lead if is_bar(lead, lead + 1) else 0
        trail = trail if is_bar(trail, size - trail - 2) else 0
        box.append((lead, size - trail))
    (x0, x1), (y0, y1) = box
    return x0, y0, x1, y1


def scale_box(box: tuple[float, float, float, float], from_size: tuple[int, int],
              to_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """`box` in a from_size = (width, height) picture -> the same region in to_size. Edges
    inside the picture move inward to even pixels (the box never takes in a bar row); edges
    on the picture's border stay there."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    x0, y0, x1, y1 = box

    def inward(lo: float, hi: float, limit: int) -> tuple[int, int]:
        a = 0 if lo <= 0 else min(limit, 2 * math.ceil(lo / 2 - 1e-6))
        b = limit if hi >= limit else max(a, 2 * math.floor(hi / 2 + 1e-6))
        return (a, b) if b > a else (0, limit)

    (a, b) = inward(x0 * sx, x1 * sx, to_size[0]) if x1 < from_size[0] or x0 > 0 else (0, to_size[0])
    (c, d) = inward(y0 * sy, y1 * sy, to_size[1]) if y1 < from_size[1] or y0 > 0 else (0, to_size[1])
    return a, c, b, d
