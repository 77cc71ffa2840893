"""Analytic evaluator for the shapes world: read a video, recover what its main object is.

Given frames (or a video file) it recovers the MAIN object's colour, shape, size, motion and
per-frame position, plus the background, with classical image processing in numpy only:

1. background of each frame = per-channel median of all its pixels (objects cover at most
   ~13% of a frame);
2. foreground = pixels farther than `fg_threshold` (RGB distance) from that background;
3. 4-connected components of each frame's foreground (runs + union-find, below);
4. main object of a frame = its LARGEST component. `sora.shapes.sample_clip` makes this rule
   right: with two objects the main one is large, the other small, and they never touch;
5. colour: the per-channel median of (pixel - background) over the core of the main object
   in all frames, matched to the palette colour whose direction from the background explains
   it best (`_classify_color`); a median, so H.264 ringing and blurred edges do not move it;
6. coverage of a pixel = its projection onto (object colour - background), in [0, 1]. Its sum
   is the object's area and its weighted mean the centroid, both sub-pixel and unchanged by
   blur. Shape = the ideal shape (drawn with `sora.shapes.signed_distance`, same area, same
   centroid) that best matches the coverage, summed over frames. Template matching uses
   every pixel, so it holds up on ~11 px objects after H.264 where a fill ratio or a corner
   test would flip;
7. size = side of that shape from its area (side^2 = area / AREA_FACTOR), over the frame's
   short side: small 0.18, large 0.36;
8. motion = least-squares slope of the centroid track times the clip length, in short sides:
   under `still_threshold` it is "still", else the dominant axis and its sign.

Every decision pools all frames (medians, sums, a line fit), so single bad frames from
compression or a generator do not flip it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from sora.shapes import AREA_FACTOR, BACKGROUNDS, COLORS, SHAPES, SIZE_FRACTION, signed_distance

ATTRIBUTES = ("color", "shape", "size", "motion")


@dataclass(frozen=True)
class EvalConfig:
    """Thresholds; each sits between the values the generator uses."""

    # RGB distance from the background that counts as foreground when looking for objects.
    # The closest palette pair is blue on navy (127 apart); 48 leaves room for blur.
    fg_threshold: float = 48.0
    # side / short side of the frame: small 0.18 | large 0.36 (split at the geometric mean)
    large_above: float = math.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["large"])
    # net displacement / short side; the smallest true travel is ~0.3 (see shapes._place)
    still_threshold: float = 0.12
    # components smaller than this are noise, never the main object
    min_pixels: int = 4
    # shape templates are fitted on this many evenly spaced frames (bounds the cost)
    template_frames: int = 12


@dataclass
class Analysis:
    """What `analyze` recovered. Attribute fields are None when no object was found.

    track: (T, 2) main-object centroid (x, y) as fractions of (width, height), NaN in frames
    without an object (same convention as `ObjectSpec.centres`).
    side: median object side / short side of the frame (0.18 small, 0.36 large).
    displacement: (dx, dy) fitted net motion in short sides (image y points down).
    shape_error: mean |coverage - ideal shape| per unit area for each shape (lower = better).
    aspect: median width / height of the object's bounding box (pixels at least half covered)
    over the template frames; every ideal shape has a square one, so 1.0 is right and e.g.
    1.5 a shape drawn half again as wide as tall (a diagnostic: no attribute reads it).
    """

    color: str | None
    shape: str | None
    size: str | None
    motion: str | None
    background: str | None
    track: np.ndarray
    found_frames: int
    side: float = float("nan")
    displacement: tuple[float, float] = (float("nan"), float("nan"))
    rgb: tuple[float, float, float] = (float("nan"),) * 3
    shape_error: dict[str, float] = field(default_factory=dict)
    aspect: float = float("nan")

    def as_dict(self) -> dict:
        """JSON-able summary (track as [x, y] or None per frame)."""
        return {"color": self.color, "shape": self.shape, "size": self.size,
                "motion": self.motion, "background": self.background,
                "found_frames": self.found_frames, "side": self.side,
                "displacement": list(self.displacement), "rgb": list(self.rgb),
                "shape_error": dict(self.shape_error), "aspect": self.aspect,
                "track": [None if np.isnan(p).any() else [float(p[0]), float(p[1])]
                          for p in self.track]}


# --------------------------------------------------------------------------------------------
# Connected components on run-length encoded masks
# --------------------------------------------------------------------------------------------


def _label_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4-connected components of each frame of a (T, H, W) bool mask (frames never connect).

    Returns (row, start, end, label) per horizontal run: run i covers row `row[i]` (the
    frame-major index t * H + y), columns start[i] .. end[i] - 1, and its component's label is
    the smallest run index in the component. Runs, not pixels, are the union-find nodes: a
    disc 50 px wide is 50 runs, not 2000 pixels, which keeps this pure numpy and fast.
    """
    T, H, W = mask.shape
    m = np.zeros((T * H, W + 2), dtype=np.int8)
    m[:, 1:-1] = mask.reshape(T * H, W)
    d = np.diff(m, axis=1)  # +1 where a run starts, -1 one past where it ends
    row, start = np.nonzero(d == 1)  # row-major order, so starts and ends pair up
    _, end = np.nonzero(d == -1)
    R = len(row)
    # Runs of row r+1 that overlap run a of row r form a contiguous index range [lo, hi):
    # starts and ends both increase within a row, so two searchsorted calls find it.
    base = W + 1
    key_start, key_end = row * base + start, row * base + end
    lo = np.searchsorted(key_end, (row + 1) * base + start, side="right")
    hi = np.searchsorted(key_start, (row + 1) * base + end, side="left")
    cnt = np.where((row + 1) % H == 0, 0, np.maximum(hi - lo, 0))  # no edges across frames
    a = np.repeat(np.arange(R), cnt)
    b = np.repeat(lo, cnt) + (np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    parent = np.arange(R)
    while True:  # hook each root onto the smallest neighbouring root, then compress fully
        pa, pb = parent[a], parent[b]
        if np.array_equal(pa, pb):
            break
        low = np.minimum(pa, pb)
        np.minimum.at(parent, pa, low)
        np.minimum.at(parent, pb, low)
        while not np.array_equal(nxt := parent[parent], parent):
            parent = nxt
    return row, start, end, parent


def largest_components(mask: np.ndarray, min_pixels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The largest 4-connected component of each frame of a (T, H, W) bool mask.

    Returns (frames, keep): the ascending indices of frames that have a component of at
    least `min_pixels` pixels, and a (T, H, W) bool mask of those components only.
    """
    T, H, W = mask.shape
    row, start, end, label = _label_runs(mask)
    keep = np.zeros(T * H * W, dtype=bool)
    if len(row) == 0:
        return np.zeros(0, dtype=np.int64), keep.reshape(T, H, W)
    length = end - start
    frame_of = row // H
    area = np.bincount(label, weights=length, minlength=len(length))
    roots = np.unique(label)
    roots = roots[area[roots] >= min_pixels]
    if len(roots) == 0:  # foreground, but only specks smaller than min_pixels
        return np.zeros(0, dtype=np.int64), keep.reshape(T, H, W)
    roots = roots[np.lexsort((-area[roots], frame_of[roots]))]  # by frame, largest first
    main_roots = roots[np.r_[True, frame_of[roots][1:] != frame_of[roots][:-1]]]
    on = np.isin(label, main_roots)
    n = length[on]
    offsets = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    keep[np.repeat(row[on] * W + start[on], n) + offsets] = True
    return frame_of[main_roots], keep.reshape(T, H, W)


# --------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------


def _nearest(palette: dict[str, tuple[int, int, int]], rgb: np.ndarray) -> str:
    names = list(palette)
    ref = np.asarray([palette[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(np.linalg.norm(ref - np.asarray(rgb)[None], axis=1)))]


def _classify_color(offset: np.ndarray, bg_rgb: np.ndarray) -> str:
    """The palette colour c that best explains `offset` (object - background) as a blend
    a * (c - background) with a in [0, 1.1]. A blend, not the nearest RGB, because a blurred
    or faded object is partly background: dim cyan on black is (0, 128, 128), exactly as far
    from green and blue as from cyan in RGB, but only cyan's direction explains it."""
    best, best_res = "", float("inf")
    for name, c in COLORS.items():
        e = np.asarray(c, dtype=np.float64) - bg_rgb
        a = float(np.clip(offset @ e / max(float(e @ e), 1e-9), 0.0, 1.1))
        res = float(np.linalg.norm(offset - a * e))
        if res < best_res:
            best, best_res = name, res
    return best


def _load(video) -> np.ndarray:
    if isinstance(video, np.ndarray):
        frames = video
    else:
        from sora.video_io import read_frames

        frames = read_frames(str(video))
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8, \
        f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}"
    return frames


# Blur levels (Gaussian sigma, px) the templates are tried at. H.264 halves chroma resolution,
# so an object that differs from its background mostly in hue (magenta on gray) comes back
# with ~1 px soft edges; a generator blurs too. A sharp template would then fit a blurred
# square worse than a circle; fitting the blur as well keeps the comparison fair.
BLURS: tuple[float, ...] = (0.0, 0.75, 1.5)


@functools.lru_cache(maxsize=16)
def _kernel(sigma: float) -> np.ndarray:
    r = int(math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return k / k.sum()


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes of (..., H, W); outside the array counts
    as 0 (background). Shifted sums, not matrix products: BLAS threads on tiny matrices are
    slower than this, and thrash on a busy machine."""
    if sigma <= 0:
        return img
    k = _kernel(sigma)
    r = len(k) // 2
    out = img
    for axis in (-2, -1):
        n = out.shape[axis]
        acc = np.zeros(out.shape, dtype=np.float64)
        for i, w in enumerate(k):
            s = i - r  # output[j] += w * input[j + s]
            lo, hi = max(0, -s), min(n, n - s)
            if lo >= hi:
                continue
            if axis == -2:
                acc[..., lo:hi, :] += w * out[..., lo + s:hi + s, :]
            else:
                acc[..., lo:hi] += w * out[..., lo + s:hi + s]
        out = acc
    return out


def _fit_frame(cover: np.ndarray, blob: np.ndarray, templates: bool
               ) -> tuple[float, float, float, dict[str, float], float] | None:
    """Area, centroid (x, y) in px and (if `templates`) per-shape template error and bounding
    box width / height (of the pixels at least half covered; NaN without templates) of one object.

    cover: (H, W) coverage in [0, 1] with every other object already zeroed; blob: (H, W) bool
    mask of this object. Measured in the blob's bounding box grown by a margin that holds the
    blurred edge.
    """
    ys, xs = np.nonzero(blob)
    H, W = cover.shape
    margin = 2 + (max(ys.max() - ys.min(), xs.max() - xs.min()) + 1) // 6
    y0, y1 = max(0, ys.min() - margin), min(H, ys.max() + margin + 1)
    x0, x1 = max(0, xs.min() - margin), min(W, xs.max() + margin + 1)
    c = cover[y0:y1, x0:x1]
    area = float(c.sum())
    if area <= 0:
        return None
    gy = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5  # pixel centres, as in render()
    gx = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
    cx, cy = float((c * gx).sum()) / area, float((c * gy).sum()) / area
    if not templates:
        return area, cx, cy, {}, float("nan")
    hy, hx = np.nonzero(c >= 0.5)
    aspect = float(hx.max() - hx.min() + 1) / float(hy.max() - hy.min() + 1) if len(hx) else float("nan")
    # (3, h, w): each ideal shape with the measured area and centroid, antialiased like render()
    ideal = np.stack([
        np.clip(0.5 - signed_distance(s, math.sqrt(area / AREA_FACTOR[s]), gx - cx, gy - cy), 0, 1)
        for s in SHAPES])
    err = np.min([np.abs(c - _blur(ideal, b)).sum(axis=(1, 2)) for b in BLURS], axis=0) / area
    return area, cx, cy, dict(zip(SHAPES, err.tolist())), aspect


def analyze(video, config: EvalConfig = EvalConfig()) -> Analysis:
    """Recover the main object of `video`: a path/URL (read with `sora.video_io.read_frames`)
    or frames (T, H, W, 3) uint8. See the module docstring for the method."""
    frames = _load(video)
    T, H, W, _ = frames.shape
    short = min(H, W)
    bg = np.median(frames.reshape(T, H * W, 3), axis=1).astype(np.float32)  # (T, 3)
    background = _nearest(BACKGROUNDS, np.median(bg, axis=0))
    diff = frames.astype(np.float32) - bg[:, None, None, :]  # (T, H, W, 3)
    track = np.full((T, 2), np.nan)

    fg = np.einsum("thwc,thwc->thw", diff, diff) > config.fg_threshold ** 2  # (T, H, W)
    found, main = largest_components(fg, config.min_pixels)
    if len(found) == 0:
        return Analysis(None, None, None, None, background, track, 0)
    # Object colour relative to the background, from the core of the blob (the half of its
    # pixels farthest from the background): blurred edges are blends that must not vote.
    d = diff[main]  # (N, 3) over every main-object pixel of the clip
    dist = np.einsum("nc,nc->n", d, d)
    offset = np.median(d[dist >= np.median(dist)], axis=0)  # (3,) object - background
    bg_rgb = np.median(bg, axis=0)
    color = _classify_color(offset, bg_rgb)
    rgb = bg_rgb + offset

    contrast = np.broadcast_to(offset.astype(np.float32), bg.shape)  # (T, 3)
    cover = np.einsum("thwc,tc->thw", diff, contrast) / np.maximum(
        np.einsum("tc,tc->t", contrast, contrast), 1.0)[:, None, None]
    cover = np.clip(cover, 0.0, 1.0)
    cover[fg & ~main] = 0.0  # the second object and noise blobs are not part of the fit

    # Templates on at most `template_frames` evenly spaced frames (shape does not change);
    # area and centroid on all of them (the track needs every frame).
    picks = np.linspace(0, len(found) - 1, min(len(found), config.template_frames)).astype(int)
    fit_on = set(found[picks].tolist())
    frames_ok, areas, errors, n_fit, aspects = [], [], {s: 0.0 for s in SHAPES}, 0, []
    for t in found:
        fit = _fit_frame(cover[t], main[t], t in fit_on)
        if fit is None:
            continue
        area, cx, cy, err, aspect = fit
        frames_ok.append(t)
        if not math.isnan(aspect):
            aspects.append(aspect)
        areas.append(area)
        track[t] = (cx / W, cy / H)
        n_fit += bool(err)
        for s, e in err.items():
            errors[s] += e
    if not n_fit:
        return Analysis(color, None, None, None, background, track, 0, rgb=tuple(map(float, rgb)))
    shape_error = {s: e / n_fit for s, e in errors.items()}
    shape = min(shape_error, key=shape_error.get)
    side = math.sqrt(float(np.median(areas)) / AREA_FACTOR[shape]) / short
    size = "large" if side > config.large_above else "small"

    # motion: least-squares line through the centroid track, over the whole clip
    f = np.asarray(frames_ok, dtype=np.float64)
    if len(f) >= 2:
        tc = f - f.mean()
        denom = float((tc ** 2).sum())
        dx = float((tc * track[frames_ok, 0] * W).sum()) / denom * (T - 1) / short
        dy = float((tc * track[frames_ok, 1] * H).sum()) / denom * (T - 1) / short
    else:
        dx = dy = 0.0
    if max(abs(dx), abs(dy)) < config.still_threshold:
        motion = "still"
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    return Analysis(color, shape, size, motion, background, track, len(frames_ok), side,
                    (dx, dy), tuple(float(v) for v in rgb), shape_error,
                    float(np.median(aspects)) if aspects else float("nan"))


def score(video, attributes: dict, config: EvalConfig = EvalConfig()) -> dict:
    """How well `video` matches `attributes` (a dict with color, shape, size, motion and
    optionally background, e.g. `ClipSpec.attributes()` or `parse_prompt(prompt)`).

    Returns a flat dict (one row of a results table): `<attr>_ok` (bool) for color, shape,
    size, motion (and background when given), `all_ok` (the four object attributes all
    right), and the recovered values (`color`, ..., `side`, `found_frames`, ...). An
    attribute the prompt leaves as None counts as right.
    """
    a = analyze(video, config)
    out: dict = {}
    keys = ATTRIBUTES + (("background",) if attributes.get("background") is not None else ())
    for k in keys:
        want = attributes.get(k)
        out[f"{k}_ok"] = want is None or getattr(a, k) == want
    out["all_ok"] = all(out[f"{k}_ok"] for k in ATTRIBUTES)
    out.update({k: v for k, v in a.as_dict().items() if k != "track"})
    return out


def accuracy(rows: list[dict]) -> dict[str, float]:
    """Per-attribute accuracy (fraction of rows with `<attr>_ok`) over `score` results."""
    assert rows, "no rows to summarise"
    keys = [k for k in rows[0] if k.endswith("_ok")]
    return {k[:-3]: float(np.mean([bool(r[k]) for r in rows])) for k in keys}
