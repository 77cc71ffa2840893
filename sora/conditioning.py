"""Generation plans: the size to generate at, and which latent frames each mode gives the model.

Every generation mode is one mechanism (docs/architecture.md, "Generation modes"): some whole latent frames
are *known* - encoded from given pixels and held clean at t = 0 while the rest is denoised. A
:class:`Layout` says, for one video, how many latent frames there are, which of them are known
(:class:`Segment`), and which of the decoded frames make up the output.

The causal VAE shapes the layouts (``sora.vae``): latent frame 0 is pixel frame 0 alone, latent
frame j >= 1 is pixel frames 4j-3 .. 4j. So:

- a segment at the START holds 4k+1 pixel frames (latent frames 0..k), encoded from its own first
  frame - exactly what the encoder saw in training, and the causal decoder gives those frames back
  from those latents alone (image-to-video, extend forward, the end of A in a join);
- a segment anywhere ELSE holds 4k pixel frames (k whole groups). In training such latents were
  encoded *after* earlier frames, so we encode them after an edge-repeat prefix (the segment's
  first frame, ``PREFIX_GROUPS`` groups of it): the encoder's causal receptive field then sees a
  plausible past. Their pixels come back as that same round trip (decoded with the prefix as
  context, see ``SoraPipeline``), so given frames are returned exactly up to the VAE.

Frame counts the caller asks for need not be 4k+1: we generate the smallest 4k+1 that fits and
drop *generated* frames (never given ones) to hit the exact count. Sizes that are not multiples of
the stride (VAE x8 times patch x2 = 16) are generated at the nearest native-aspect stride-16 size
and resized to the exact request (cover + centre crop) - see :func:`plan_size`.

Everything here is pure numpy/python: shapes are (T, H, W, 3) uint8 frames at any size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

MODES = ("text-to-video", "image-to-video", "extend-forward", "extend-backward", "join", "loop", "edit", "draft")
PREFIX_GROUPS = 2  # edge-repeat groups encoded before a non-initial segment (encoder context)
LOOP_SETTLE = 3  # frames of the loop's final static group dropped: one copy of frame 0 remains


# ----------------------------------------------------------------------------------------
# Size and length
# ----------------------------------------------------------------------------------------


def plan_size(width: int, height: int, stride: int = 16) -> tuple[int, int]:
    """The (width, height) to generate at for a requested ``width`` x ``height``.

    Multiples of ``stride`` are generated as asked. Anything else gets the nearest stride
    multiple in both aspect and area: the candidate minimising |log aspect error| + 1/4 |log
    area ratio| (aspect matters more: the final resize is a cover + centre crop, which keeps
    shapes undistorted but crops away the aspect error)."""
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive, got {width}x{height}")
    if width % stride == 0 and height % stride == 0:
        return width, height
    aspect, area = width / height, width * height
    best: tuple[float, int, int] | None = None
    h0 = max(1, round(height / stride))
    for hs in range(max(1, h0 - 3), h0 + 4):
        h = hs * stride
        for ws in {max(1, math.floor(aspect * h / stride)), max(1, math.ceil(aspect * h / stride))}:
            w = ws * stride
            score = abs(math.log((w / h) / aspect)) + 0.25 * abs(math.log(w * h / area))
            if best is None or score < best[0] - 1e-12:
                best = (score, w, h)
    assert best is not None
    return best[1], best[2]


def plan_frames(num_frames: int, temporal: int = 4) -> int:
    """The smallest ``temporal * k + 1`` >= ``num_frames`` (what the causal VAE decodes)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    return 1 + temporal * math.ceil((num_frames - 1) / temporal)


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" (also "W*H", "W,H") -> (width, height), positive ints; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*,]\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"size must look like WIDTHxHEIGHT (e.g. 160x90), got {text!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return w, h


def frames_for(seconds: float, fps: float) -> int:
    """Frames of ``seconds`` of video at ``fps`` (at least 1)."""
    if seconds <= 0 or fps <= 0:
        raise ValueError(f"seconds and fps must be positive, got {seconds} s at {fps} fps")
    return max(1, int(round(seconds * fps)))


# ----------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------


@dataclass
class Segment:
    """Known frames of one video: ``frames`` (F, H, W, 3) uint8 at any size, placed at latent
    frame ``latent_start``. F = 4k+1 when latent_start == 0, else 4k (see module docstring).
    ``source`` names the input ("image", "video", "a", "b"); ``source_index`` (F,) is the index
    of each frame in that input (for reporting where given frames landed)."""

    frames: np.ndarray
    latent_start: int
    source: str
    source_index: np.ndarray
    # A still group of the video's own first frame (the end of a loop): its pixels are output
    # as decoded frame 0 itself, so the loop closes exactly whatever the VAE's error.
    still_of_first: bool = False

    def __post_init__(self) -> None:
        F = len(self.frames)
        if self.latent_start == 0:
            assert (F - 1) % 4 == 0, f"a segment at latent frame 0 needs 4k+1 frames, got {F}"
        else:
            assert F % 4 == 0 and F > 0, f"a segment after latent frame 0 needs 4k frames, got {F}"
        assert len(self.source_index) == F, "one source index per frame"

    @property
    def num_latents(self) -> int:
        return 1 + (len(self.frames) - 1) // 4 if self.latent_start == 0 else len(self.frames) // 4

    @property
    def latent_frames(self) -> list[int]:
        return list(range(self.latent_start, self.latent_start + self.num_latents))

    @property
    def pixel_range(self) -> tuple[int, int]:
        """[lo, hi) of the decoded frames this segment occupies."""
        if self.latent_start == 0:
            return 0, len(self.frames)
        lo = 4 * self.latent_start - 3
        return lo, lo + len(self.frames)


@dataclass
class Layout:
    """One video's plan: ``latent_frames`` T' (so 4(T'-1)+1 decoded frames), the known
    ``segments``, and ``keep``: the decoded frame indices that form the output, in order."""

    latent_frames: int
    segments: list[Segment] = field(default_factory=list)
    keep: list[int] = field(default_factory=list)
    init_frames: np.ndarray | None = None  # (G, H, W, 3) pixels to start from (SDEdit), or None

    @property
    def decoded_frames(self) -> int:
        return 1 + 4 * (self.latent_frames - 1)

    @property
    def known_latent_frames(self) -> list[int]:
        return sorted(f for s in self.segments for f in s.latent_frames)

    def given(self) -> list[dict]:
        """Where given frames land in the output: per segment, its source and the output /
        source frame index of every kept frame."""
        where = {d: o for o, d in enumerate(self.keep)}
        out = []
        for s in self.segments:
            lo, _ = s.pixel_range
            pairs = [(where[lo + i], int(s.source_index[i])) for i in range(len(s.frames)) if lo + i in where]
            out.append({"source": s.source, "output_frames": [p[0] for p in pairs],
                        "source_frames": [p[1] for p in pairs]})
        return out


def _latents_for(num_frames: int) -> int:
    return 1 + (plan_frames(num_frames) - 1) // 4


def _drop_generated(layout: Layout, num_frames: int, from_start: bool) -> Layout:
    """Set ``layout.keep`` to ``num_frames`` decoded frames, dropping generated ones only: the
    first ones (``from_start``) or the last ones that come before the final known segment."""
    G = layout.decoded_frames
    given = set()
    for s in layout.segments:
        lo, hi = s.pixel_range
        given.update(range(lo, hi))
    drop = G - num_frames
    assert drop >= 0, f"layout holds {G} frames, fewer than the {num_frames} asked for"
    generated = [d for d in range(G) if d not in given]
    assert len(generated) >= drop, "cannot reach the frame count by dropping generated frames only"
    if from_start:
        dropped = set(generated[:drop])
    else:
        # the last generated frames: at the very end when nothing is known there, else just
        # before the final segment (a few frames of a transition, where it shows least)
        dropped = set(generated[len(generated) - drop:]) if drop else set()
    layout.keep = [d for d in range(G) if d not in dropped]
    return layout


def text_to_video(num_frames: int) -> Layout:
    T = _latents_for(num_frames)
    return _drop_generated(Layout(T), num_frames, from_start=False)


def image_to_video(image: np.ndarray, num_frames: int) -> Layout:
    """The image (1, H, W, 3) as frame 0."""
    seg = Segment(image[:1], 0, "image", np.zeros(1, dtype=np.int64))
    return _drop_generated(Layout(_latents_for(num_frames), [seg]), num_frames, from_start=False)


def extend_forward(video: np.ndarray, num_frames: int, context_frames: int | None = None) -> Layout:
    """Output = the END of ``video`` (its last 4k+1 frames that fit, at most ``context_frames``)
    followed by new frames; ``num_frames`` counts both."""
    T = _latents_for(num_frames)
    if T < 2:
        raise ValueError(f"extending needs room for new frames: num_frames must be > 1, got {num_frames}")
    F = len(video) if context_frames is None else min(len(video), context_frames)
    k = min(1 + (F - 1) // 4, T - 1)  # latent frames of context; at least one stays new
    n = 1 + 4 * (k - 1)
    seg = Segment(video[len(video) - n:], 0, "video", np.arange(len(video) - n, len(video)))
    return _drop_generated(Layout(T, [seg]), num_frames, from_start=False)


def _end_segment(frames: np.ndarray, source: str, T: int, max_latents: int, first_index: int = 0) -> Segment:
    """The first 4k frames of ``frames`` (k <= max_latents) as the last k latent frames of T.
    Fewer than 4 frames are padded by repeating the first (an image becomes a still group)."""
    if len(frames) < 4:
        idx = np.concatenate([np.zeros(4 - len(frames), dtype=np.int64), np.arange(len(frames))])
    else:
        k = min(len(frames) // 4, max_latents)
        idx = np.arange(4 * k)
    return Segment(frames[idx], T - len(idx) // 4, source, idx + first_index)


def extend_backward(video: np.ndarray, num_frames: int, context_frames: int | None = None) -> Layout:
    """Output = new frames followed by the START of ``video`` (its first 4k frames that fit)."""
    T = _latents_for(num_frames)
    if T < 2:
        raise ValueError(f"extending needs room for new frames: num_frames must be > 1, got {num_frames}")
    F = len(video) if context_frames is None else min(len(video), context_frames)
    # leave at least one new frame: k groups of given frames <= num_frames - 1
    seg = _end_segment(video[:F], "video", T, max_latents=max(1, min(T - 1, (num_frames - 1) // 4)))
    layout = Layout(T, [seg])
    if len(seg.frames) >= num_frames:  # too short for a whole group plus a new frame:
        # keep one new frame and the group's first given frames (the start of the video)
        layout.keep = [seg.pixel_range[0] - 1] + list(range(seg.pixel_range[0], seg.pixel_range[0] + num_frames - 1))
        return layout
    return _drop_generated(layout, num_frames, from_start=True)


def join(a: np.ndarray, b: np.ndarray, num_frames: int, context_frames: int | None = None) -> Layout:
    """Output = the end of ``a``, a generated transition, the start of ``b``. Each side gets at
    most a third of the latent frames (or ``context_frames`` pixel frames)."""
    T = _latents_for(num_frames)
    if T < 3:
        raise ValueError(f"joining needs room for a transition: num_frames must be > 5, got {num_frames}")
    side = max(1, (T - 1) // 3)
    if context_frames is not None:
        side = max(1, min(side, context_frames // 4))
    Fa = min(len(a), 1 + 4 * (side - 1))
    start = Segment(a[len(a) - Fa:], 0, "a", np.arange(len(a) - Fa, len(a)))
    end = _end_segment(b, "b", T, max_latents=side)
    return _drop_generated(Layout(T, [start, end]), num_frames, from_start=False)


def loop(first: np.ndarray, num_frames: int, context_frames: int | None = None, source: str | None = None) -> Layout:
    """A video that ends where it starts. ``first`` (F, H, W, 3): an image (F = 1) or the start
    of a video (its first 4k+1 frames that fit are kept). The last latent frame is a still group
    of ``first[0]``, of which one copy is kept: the last output frame equals the first."""
    if num_frames < 2:
        raise ValueError(f"a loop needs at least 2 frames, got {num_frames}")
    T = _latents_for(num_frames + LOOP_SETTLE)
    F = len(first) if context_frames is None else max(1, min(len(first), context_frames))
    k = max(1, min(1 + (F - 1) // 4, (T - 1) // 2))  # the given start takes at most half
    source = source or ("video" if len(first) > 1 else "image")
    start = Segment(first[: 1 + 4 * (k - 1)], 0, source, np.arange(1 + 4 * (k - 1)))
    end = Segment(np.repeat(first[:1], 4, axis=0), T - 1, start.source, np.zeros(4, dtype=np.int64), still_of_first=True)
    layout = Layout(T, [start, end])
    G = layout.decoded_frames
    settle = set(range(G - 4, G - 4 + LOOP_SETTLE))
    generated = [d for d in range(G) if d < G - 4 and d >= len(start.frames)]
    drop = G - LOOP_SETTLE - num_frames
    dropped = settle | set(generated[len(generated) - drop:] if drop else [])
    layout.keep = [d for d in range(G) if d not in dropped]
    assert len(layout.keep) == num_frames, f"loop layout keeps {len(layout.keep)} frames, not {num_frames}"
    return layout


def edit(video: np.ndarray, num_frames: int) -> Layout:
    """SDEdit: start from ``video``'s first frames (the last one repeated if it is short)."""
    T = _latents_for(num_frames)
    G = 1 + 4 * (T - 1)
    idx = np.minimum(np.arange(G), len(video) - 1)
    layout = Layout(T, init_frames=video[idx])
    return _drop_generated(layout, num_frames, from_start=False)
