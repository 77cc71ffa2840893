"""The shapes world: a procedural text-to-video dataset small enough to learn on a CPU.

A clip shows one or two flat shapes on a plain background; each shape moves in a straight
line (left, right, up, down) or stays still. Everything a caption says can be measured back
from the pixels (see `sora.evaluator`), so prompt adherence of generated video is exact.

    >>> spec = sample_clip(seed=0, index=0)
    >>> frames = render(spec)                       # (T, H, W, 3) uint8
    >>> parse_prompt(spec.caption())["color"] == spec.objects[0].color
    True

Conventions (the evaluator relies on them, see `sample_clip`):
- Object size is a fraction of the frame's SHORT side (small 0.18, large 0.36), so "size"
  means the same thing at every resolution and aspect ratio.
- The MAIN object is `objects[0]`; it comes first in every caption. In a two-object clip the
  main object is always large and the second always small, of a different colour, and the
  two never touch: "main object = largest connected blob" is therefore a sound rule.
- Objects stay entirely inside the frame and moving ones travel 50-80% of the free range
  along their axis, so motion is obvious at every aspect ratio.
- A clip's spec depends only on (seed, index): clip i is the same whatever N is.
- Colours are pure (0/255 channels, plus gray 128 and navy) so they survive H.264's 4:2:0.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable, Collection, Iterable

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTION: dict[str, float] = {"small": 0.18, "large": 0.36}  # of the frame's short side
# area / side^2 of each shape (the triangle's base and height both equal its side)
AREA_FACTOR: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "navy": (0, 0, 128),
}
ASPECT_RATIOS: dict[str, float] = {
    "16:9": 16 / 9, "9:16": 9 / 16, "1:1": 1.0, "4:3": 4 / 3, "3:4": 3 / 4, "2.39:1": 2.39,
}

Combo = tuple[str, str, str, str]  # (color, shape, size, motion) of one object


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One shape. Centres are fractions of width/height; (x0, y0) at the first frame,
    (x1, y1) at the last, linear in between. The centre is the area centroid (for the
    triangle, a third of the way up from its base)."""

    shape: str
    color: str
    size: str
    motion: str
    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self):
        assert self.shape in SHAPES, f"unknown shape {self.shape!r}"
        assert self.color in COLORS, f"unknown color {self.color!r}"
        assert self.size in SIZES, f"unknown size {self.size!r}"
        assert self.motion in MOTIONS, f"unknown motion {self.motion!r}"

    @property
    def combo(self) -> Combo:
        return (self.color, self.shape, self.size, self.motion)

    def centres(self, num_frames: int) -> np.ndarray:
        """(T, 2) centre (x, y) as fractions of (width, height) for each frame."""
        s = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
        return np.stack([self.x0 + (self.x1 - self.x0) * s, self.y0 + (self.y1 - self.y0) * s], 1)


@dataclass(frozen=True)
class ClipSpec:
    """A whole clip: objects (main first), background, size, length and frame rate."""

    objects: tuple[ObjectSpec, ...]
    background: str
    width: int
    height: int
    num_frames: int
    fps: int
    aspect_ratio: str = ""  # the ASPECT_RATIOS name it was sampled with ("" if built by hand)
    template: int = 0  # which caption template `caption()` uses (varied per clip)

    def __post_init__(self):
        assert 1 <= len(self.objects) <= 2, f"one or two objects, got {len(self.objects)}"
        assert self.background in BACKGROUNDS, f"unknown background {self.background!r}"
        assert self.width % 2 == 0 and self.height % 2 == 0, \
            f"H.264 4:2:0 needs even sides, got {self.width}x{self.height}"
        assert self.num_frames >= 1 and self.fps > 0

    def short_caption(self) -> str:
        """The short tag, e.g. "red circle" or "red circle and blue square"."""
        return " and ".join(f"{o.color} {o.shape}" for o in self.objects)

    def caption(self) -> str:
        """A descriptive sentence naming size, colour, shape and motion of every object and the
        background, e.g. "A large red circle moves from left to right across a black
        background." The template varies with `self.template`."""
        return describe(self.objects, self.background, self.template)

    def attributes(self) -> dict:
        """Every attribute as a flat JSON-able dict (second-object keys are None when there is
        one object), plus `objects` with the full geometry for exact re-rendering."""
        main = self.objects[0]
        second = self.objects[1] if len(self.objects) > 1 else None
        out = {"color": main.color, "shape": main.shape, "size": main.size, "motion": main.motion,
               "background": self.background}
        for k in ("color", "shape", "size", "motion"):
            out[f"{k}2"] = getattr(second, k) if second else None
        out.update(num_objects=len(self.objects), width=self.width, height=self.height,
                   num_frames=self.num_frames, fps=self.fps, aspect_ratio=self.aspect_ratio,
                   template=self.template, objects=[asdict(o) for o in self.objects])
        return out

    @staticmethod
    def from_attributes(attrs: dict) -> "ClipSpec":
        """Inverse of `attributes()`."""
        return ClipSpec(tuple(ObjectSpec(**o) for o in attrs["objects"]), attrs["background"],
                        attrs["width"], attrs["height"], attrs["num_frames"], attrs["fps"],
                        attrs.get("aspect_ratio", ""), attrs.get("template", 0))


@dataclass(frozen=True)
class ClipRanges:
    """What `sample_clip` draws from. Defaults keep clips small enough to train on 2 CPU cores.
    `TINY` (below) is for fast tests."""

    short_sides: tuple[int, ...] = tuple(range(64, 145, 8))  # short sides in pixels (even, for 4:2:0)
    frame_counts: tuple[int, ...] = tuple(range(9, 42, 4))  # frame counts to draw from (4k+1 suits the causal VAE)
    fps: tuple[int, ...] = (8, 12, 16, 24)  # frame rates to draw from
    aspects: tuple[str, ...] = tuple(ASPECT_RATIOS)  # aspect ratios, cycled by clip index (not drawn)
    two_object_prob: float = 0.3  # chance that a clip has a second object

    def __post_init__(self):
        if not self.short_sides or any(s < 16 or s % 2 for s in self.short_sides):
            raise ValueError(f"short_sides must be even and >= 16 (H.264 4:2:0), got {self.short_sides}")
        if not self.frame_counts or min(self.frame_counts) < 1:
            raise ValueError(f"frame_counts must be >= 1, got {self.frame_counts}")
        if not self.fps or min(self.fps) < 1:
            raise ValueError(f"fps must be >= 1, got {self.fps}")
        unknown = [a for a in self.aspects if a not in ASPECT_RATIOS]
        if not self.aspects or unknown:
            raise ValueError(f"aspects must be among {list(ASPECT_RATIOS)}, got {list(self.aspects)}")
        if not 0 <= self.two_object_prob <= 1:
            raise ValueError(f"two_object_prob is a probability in [0, 1], got {self.two_object_prob}")


DEFAULT_RANGES = ClipRanges()
TINY = ClipRanges(short_sides=(64, 72), frame_counts=(9, 13), fps=(8, 12))


# --------------------------------------------------------------------------------------------
# Held-out combinations (compositional generalisation test)
# --------------------------------------------------------------------------------------------


def all_combinations() -> list[Combo]:
    """Every (color, shape, size, motion): 7 * 3 * 2 * 5 = 210."""
    return list(itertools.product(COLORS, SHAPES, SIZES, MOTIONS))


def held_out_combinations() -> frozenset[Combo]:
    """The 21 combos (10%) never shown in training. A fixed arithmetic rule rather than a
    random draw, so it can never drift; it was chosen so that every value and every PAIR and
    TRIPLE of values of a held-out combo still occurs in the training combos (tested): the
    model has seen "red" + "triangle" + "up", just never all with "small"."""
    c, s, z, m = list(COLORS), list(SHAPES), list(SIZES), list(MOTIONS)
    def key(k: Combo) -> int:
        return c.index(k[0]) + 2 * s.index(k[1]) + 3 * z.index(k[2]) + 4 * m.index(k[3])

    return frozenset(k for k in all_combinations() if key(k) % 10 == 0)


def train_combinations() -> list[Combo]:
    """All combos minus the held-out ones, in a fixed order."""
    held = held_out_combinations()
    return [k for k in all_combinations() if k not in held]


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def frame_size(short_side: int, aspect: str) -> tuple[int, int]:
    """(width, height) with the given short side and aspect ratio name, both sides even."""
    r = ASPECT_RATIOS[aspect]
    long_side = 2 * int(round(short_side * max(r, 1 / r) / 2))
    return (long_side, short_side) if r >= 1 else (short_side, long_side)


def _extents(shape: str, side: float) -> tuple[float, float, float, float]:
    """(left, right, up, down) reach of a shape of `side` px from its centroid."""
    if shape == "triangle":  # apex 2/3 of the height above the centroid, base 1/3 below
        return side / 2, side / 2, 2 * side / 3, side / 3
    return side / 2, side / 2, side / 2, side / 2


def _place(rng: np.random.Generator, shape: str, size: str, motion: str, width: int,
           height: int) -> tuple[float, float, float, float]:
    """Start and end centres (fractions), keeping the whole shape inside the frame (1 px spare
    for antialiasing) and moving 50-80% of the free range along the motion axis."""
    side = SIZE_FRACTION[size] * min(width, height)
    left, right, up, down = _extents(shape, side)
    xlo, xhi = left + 1, width - right - 1
    ylo, yhi = up + 1, height - down - 1
    assert xhi > xlo and yhi > ylo, f"{size} {shape} does not fit in {width}x{height}"
    x = float(rng.uniform(xlo, xhi))
    y = float(rng.uniform(ylo, yhi))
    x0 = x1 = x
    y0 = y1 = y
    if motion in ("left", "right"):
        d = float(rng.uniform(0.5, 0.8)) * (xhi - xlo)
        a = float(rng.uniform(xlo, xhi - d))
        x0, x1 = (a, a + d) if motion == "right" else (a + d, a)
    elif motion in ("up", "down"):
        d = float(rng.uniform(0.5, 0.8)) * (yhi - ylo)
        a = float(rng.uniform(ylo, yhi - d))
        y0, y1 = (a, a + d) if motion == "down" else (a + d, a)
    # Rounded so that a spec survives a JSON round trip bit-exactly (re-rendering is exact).
    return (round(x0 / width, 4), round(y0 / height, 4),
            round(x1 / width, 4), round(y1 / height, 4))


def _apart(a: ObjectSpec, b: ObjectSpec, width: int, height: int, num_frames: int) -> bool:
    """True when the two shapes stay at least 2 px apart in every frame (a bound through
    their circumradii, so it is conservative)."""
    short = min(width, height)
    scale = np.array([width, height], dtype=np.float64)
    ca, cb = a.centres(num_frames) * scale, b.centres(num_frames) * scale
    # Farthest point from the centroid: square corner side/sqrt(2), triangle apex 2/3 side,
    # circle side/2. 0.75 side bounds all three with room for the antialiased rim.
    reach = 0.75 * short * (SIZE_FRACTION[a.size] + SIZE_FRACTION[b.size]) + 2.0
    return bool(np.min(np.linalg.norm(ca - cb, axis=1)) > reach)


def sample_clip(seed: int, index: int, *, ranges: ClipRanges = DEFAULT_RANGES,
                allowed: Collection[Combo] | None = None,
                exclude: Collection[Combo] | None = None) -> ClipSpec:
    """The spec of clip `index` of the dataset with `seed` (independent of how many clips).

    allowed: combos (color, shape, size, motion) objects may take (None = all 210).
    exclude: combos no object may take, e.g. `held_out_combinations()` for training data.
    The aspect ratio cycles through `ranges.aspects` by index, so any 6 consecutive clips
    cover all of them. Two-object clips obey the main-object rule in the module docstring.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0x5A4E])
    aspect = ranges.aspects[index % len(ranges.aspects)]
    width, height = frame_size(int(rng.choice(ranges.short_sides)), aspect)
    num_frames = int(rng.choice(ranges.frame_counts))
    fps = int(rng.choice(ranges.fps))
    background = str(rng.choice(list(BACKGROUNDS)))
    template = int(rng.integers(NUM_TEMPLATES))
    pool = list(allowed) if allowed is not None else all_combinations()
    if exclude is not None:
        excluded = set(exclude)
        pool = [k for k in pool if k not in excluded]
    assert pool, "no combination left to sample from"
    two = bool(rng.random() < ranges.two_object_prob)
    mains = [k for k in pool if k[2] == "large"] if two else pool
    if not mains:  # the filters leave no large main object: fall back to one object
        two, mains = False, pool
    main_combo = mains[int(rng.integers(len(mains)))]
    main = ObjectSpec(main_combo[1], main_combo[0], main_combo[2], main_combo[3],
                      *_place(rng, main_combo[1], main_combo[2], main_combo[3], width, height))
    objects = [main]
    seconds = [k for k in pool if k[2] == "small" and k[0] != main.color]
    if two and seconds:
        combo = seconds[int(rng.integers(len(seconds)))]
        for _ in range(50):  # rejection: re-place until the two never touch
            other = ObjectSpec(combo[1], combo[0], combo[2], combo[3],
                               *_place(rng, combo[1], combo[2], combo[3], width, height))
            if _apart(main, other, width, height, num_frames):
                objects.append(other)
                break
    return ClipSpec(tuple(objects), background, width, height, num_frames, fps, aspect, template)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def signed_distance(shape: str, side: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Signed distance in px (negative inside) from pixel centres at offsets (dx, dy) from the
    centroid. Exact inside and along edges, approximate near corners: enough for 1 px of
    antialiasing."""
    if shape == "circle":
        return np.hypot(dx, dy) - side / 2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - side / 2
    # Isosceles triangle, apex up, base = height = side: half-planes of base and two edges.
    # Edge normals (-+2, -1)/sqrt(5) come from the edge direction (side/2, -side).
    ay = dy + 2 * side / 3  # offset from the apex
    base = dy - side / 3
    sq5 = math.sqrt(5.0)
    return np.maximum(base, np.maximum((-2 * dx - ay) / sq5, (2 * dx - ay) / sq5))


def render(spec: ClipSpec, frames: Iterable[int] | None = None) -> np.ndarray:
    """Draw the clip. Returns (T, H, W, 3) uint8 RGB; with `frames` (indices into the clip's
    num_frames) only those frames, (len(frames), H, W, 3), each exactly as in the full clip.

    Each shape is composited with coverage = clip(0.5 - signed distance, 0, 1), i.e. one pixel
    of antialiasing, so sub-pixel motion is smooth. Drawn in reverse, so the main object is on
    top (they never overlap anyway). Deterministic: pure float64 numpy, no randomness.
    """
    T, H, W = spec.num_frames, spec.height, spec.width
    picked = np.arange(T) if frames is None else np.asarray(list(frames), dtype=np.int64)
    assert picked.size and picked.min() >= 0 and picked.max() < T, f"frames must index [0, {T}): {frames}"
    out = np.empty((len(picked), H, W, 3), dtype=np.float64)
    out[:] = np.asarray(BACKGROUNDS[spec.background], dtype=np.float64)
    ys = np.arange(H, dtype=np.float64)[None, :, None] + 0.5  # (1, H, 1) pixel centres
    xs = np.arange(W, dtype=np.float64)[None, None, :] + 0.5  # (1, 1, W)
    short = min(W, H)
    for obj in reversed(spec.objects):
        side = SIZE_FRACTION[obj.size] * short
        c = obj.centres(T)[picked] * np.array([W, H], dtype=np.float64)  # (T', 2) in px
        dist = signed_distance(obj.shape, side, xs - c[:, 0, None, None], ys - c[:, 1, None, None])
        alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]  # (T, H, W, 1)
        out += alpha * (np.asarray(COLORS[obj.color], dtype=np.float64) - out)
    return np.rint(out).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

# motion -> (finite verb phrase, participle phrase) variants; every one parses back uniquely.
_MOTION_PHRASES: dict[str, tuple[tuple[str, str], ...]] = {
    "left": (("moves from right to left", "moving from right to left"),
             ("drifts to the left", "drifting to the left"),
             ("slides leftward", "sliding leftward")),
    "right": (("moves from left to right", "moving from left to right"),
              ("drifts to the right", "drifting to the right"),
              ("slides rightward", "sliding rightward")),
    "up": (("moves from bottom to top", "moving from bottom to top"),
           ("rises", "rising"),
           ("floats upward", "floating upward")),
    "down": (("moves from top to bottom", "moving from top to bottom"),
             ("falls", "falling"),
             ("sinks downward", "sinking downward")),
    "still": (("stays still", "staying still"),
              ("sits motionless", "sitting motionless"),
              ("rests in place", "resting in place")),
}

# {obj} = "large red circle", {vp} finite verb phrase, {pp} participle, {bg} background name.
_TEMPLATES: tuple[str, ...] = (
    "A {obj} {vp} {across} a {bg} background",
    "On a {bg} background, a {obj} {vp}",
    "A {obj} {pp} against a {bg} backdrop",
    "A plain {bg} scene: a {obj} {vp}",
)
NUM_TEMPLATES = len(_TEMPLATES) * 3  # sentence forms x motion phrasings


def describe(objects: Iterable[ObjectSpec], background: str, template: int = 0) -> str:
    """The descriptive caption (see `ClipSpec.caption`). `template` picks the sentence form
    (template % 4) and the motion phrasing (template // 4), so a clip's caption is fixed by its
    spec; there are NUM_TEMPLATES combinations."""
    objects = list(objects)
    main = objects[0]
    form, variant = template % len(_TEMPLATES), template // len(_TEMPLATES)
    phrases = _MOTION_PHRASES[main.motion]
    vp, pp = phrases[variant % len(phrases)]
    text = _TEMPLATES[form].format(
        obj=f"{main.size} {main.color} {main.shape}", vp=vp, pp=pp, bg=background,
        across="on" if main.motion == "still" else "across")
    if len(objects) > 1:
        o = objects[1]
        vp2 = _MOTION_PHRASES[o.motion][(variant + 1) % len(_MOTION_PHRASES[o.motion])][0]
        joiner = ", while a" if form % 2 == 0 else ". A"
        text += f"{joiner} {o.size} {o.color} {o.shape} {vp2}"
    return text + "."


# --------------------------------------------------------------------------------------------
# Prompt parsing
# --------------------------------------------------------------------------------------------

_SHAPE_WORDS = {"circle": "circle", "circles": "circle", "disc": "circle", "disk": "circle",
                "ball": "circle", "dot": "circle", "square": "square", "squares": "square",
                "box": "square", "block": "square", "triangle": "triangle", "triangles": "triangle"}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large",
               "big": "large", "huge": "large"}
_COLOR_WORDS = {**{c: c for c in COLORS}, "purple": "magenta", "pink": "magenta"}
_BG_WORDS = {"black": "black", "gray": "gray", "grey": "gray", "navy": "navy"}
# Direction words. "top"/"bottom" only count after "to"/"from" (a target or a source).
_DIR_WORDS = {"left": "left", "leftward": "left", "leftwards": "left", "right": "right",
              "rightward": "right", "rightwards": "right", "up": "up", "upward": "up",
              "upwards": "up", "top": "up", "down": "down", "downward": "down",
              "downwards": "down", "bottom": "down"}
_DIR_VERBS = {"rise": "up", "rises": "up", "rising": "up", "ascend": "up", "ascends": "up",
              "ascending": "up", "climb": "up", "climbs": "up", "climbing": "up",
              "fall": "down", "falls": "down", "falling": "down", "sink": "down",
              "sinks": "down", "sinking": "down", "descend": "down", "descends": "down",
              "descending": "down", "drop": "down", "drops": "down", "dropping": "down"}
_STILL_WORDS = {"still", "stationary", "motionless", "static", "unmoving", "stays", "stay",
                "staying", "sits", "sitting", "rests", "resting", "place", "idle", "frozen"}
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
_NEGATIONS = {"not", "no", "never", "t"}  # "t" from "doesn't" after tokenising


def _motion_of(tokens: list[str]) -> str | None:
    """Motion named in a token span. Priority: a target ("to the left") > a plain word
    ("left", "rises") > the opposite of a source ("from the left") > a still word."""
    target = plain = source = None
    still = False
    for i, w in enumerate(tokens):
        prev = tokens[i - 1] if i >= 1 else ""
        prev2 = tokens[i - 2] if i >= 2 else ""
        lead = prev2 if prev == "the" else prev  # skip one "the"
        if w in _DIR_WORDS:
            d = _DIR_WORDS[w]
            if lead in ("to", "toward", "towards", "into"):
                target = d
            elif lead == "from":
                source = _OPPOSITE[d]
            elif lead in ("at", "on", "in") or w in ("top", "bottom"):
                continue  # a location ("on the left"), not a motion
            else:
                plain = d
        elif w in _DIR_VERBS:
            plain = _DIR_VERBS[w]
        elif w in _STILL_WORDS or (w in ("move", "moving", "moves") and prev in _NEGATIONS):
            still = True
    return target or plain or source or ("still" if still else None)


def parse_prompt(text: str) -> dict:
    """Recover the attributes a prompt asks for. Returns a dict with keys color, shape, size,
    motion, background (main object) and color2, shape2, size2, motion2 (second object);
    anything the text does not say is None. Unknown words are ignored.

    Works on short tags ("red circle"), our descriptive captions, and free phrasings
    ("a big blue square moving up on grey"). Objects are split at shape words: colour and size
    words belong to the next shape word; motion words to the shape word before them (or the
    first object when they come before every shape word).
    """
    tokens = re.findall(r"[a-z]+", text.lower())
    shape_at = [i for i, w in enumerate(tokens) if w in _SHAPE_WORDS][:2]
    n_obj = max(1, len(shape_at))
    objs = [{"color": None, "shape": None, "size": None, "motion": None} for _ in range(n_obj)]
    for k, i in enumerate(shape_at):
        objs[k]["shape"] = _SHAPE_WORDS[tokens[i]]
    bounds = shape_at + [len(tokens)] if shape_at else [len(tokens)]
    background = None
    for i, w in enumerate(tokens):
        # adjectives: the first shape word at or after them (the last one if none follows)
        k = next((j for j, b in enumerate(bounds[:n_obj]) if i <= b), n_obj - 1)
        if w in _COLOR_WORDS and objs[k]["color"] is None:
            objs[k]["color"] = _COLOR_WORDS[w]
        elif w in _SIZE_WORDS and objs[k]["size"] is None:
            objs[k]["size"] = _SIZE_WORDS[w]
        elif w in _BG_WORDS and background is None:
            background = _BG_WORDS[w]
    for k in range(n_obj):
        lo = 0 if k == 0 else shape_at[k]
        hi = shape_at[k + 1] if k + 1 < len(shape_at) else len(tokens)
        objs[k]["motion"] = _motion_of(tokens[lo:hi])
    out = dict(objs[0], background=background)
    second = objs[1] if n_obj > 1 else {}
    for key in ("color", "shape", "size", "motion"):
        out[f"{key}2"] = second.get(key)
    return out


# --------------------------------------------------------------------------------------------
# Evaluation prompts (held-out combos at every aspect ratio)
# --------------------------------------------------------------------------------------------


def make_eval_prompts(n: int, seed: int, *, resolution: str = "64p",
                      frame_counts: tuple[int, ...] = (17, 25, 33),
                      combos: Collection[Combo] | None = None) -> list[dict]:
    """`n` single-object prompts over held-out combos (cycled in a seeded order) and the six
    aspect ratios (cycled). Sizes are multiples of 16 fitting `resolution`'s pixel budget
    (what the model generates directly). Each dict: prompt (descriptive), short_prompt, the
    attributes (color, shape, size, motion, background), width, height, num_frames, fps,
    aspect_ratio, and `reference`: the attributes of a clip that satisfies the prompt (render
    it with `render(ClipSpec.from_attributes(...))` for an upper-bound score)."""
    from sora.buckets import RESOLUTIONS, fit_size

    pool = sorted(combos if combos is not None else held_out_combinations())
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xE7A1]).permutation(len(pool))
    area = RESOLUTIONS[resolution][0]
    aspects = list(ASPECT_RATIOS)
    prompts = []
    for i in range(n):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i, 0xE7A1])
        color, shape, size, motion = pool[int(order[i % len(pool)])]
        aspect = aspects[i % len(aspects)]
        width, height = fit_size(ASPECT_RATIOS[aspect], area)
        spec = ClipSpec(
            (ObjectSpec(shape, color, size, motion,
                        *_place(rng, shape, size, motion, width, height)),),
            str(rng.choice(list(BACKGROUNDS))), width, height, int(rng.choice(frame_counts)),
            int(rng.choice((8, 12, 16, 24))), aspect, int(rng.integers(NUM_TEMPLATES)))
        attrs = spec.attributes()
        prompts.append({
            "index": i, "prompt": spec.caption(), "short_prompt": spec.short_caption(),
            **{k: attrs[k] for k in ("color", "shape", "size", "motion", "background", "width",
                                     "height", "num_frames", "fps", "aspect_ratio")},
            "reference": attrs})
    return prompts


# --------------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------------


def clip_name(index: int) -> str:
    return f"clip_{index:06d}.mp4"


def synth_clip(out_dir: str, seed: int, index: int, *, ranges: ClipRanges = DEFAULT_RANGES,
               exclude: Collection[Combo] | None = None) -> dict:
    """Render and encode clip `index` into `out_dir` (path or fsspec URL). Returns its
    captions.jsonl record. The unit of work, so a Ray task can call it per index."""
    from sora.video_io import write_video

    spec = sample_clip(seed, index, ranges=ranges, exclude=exclude)
    name = clip_name(index)
    write_video(f"{out_dir.rstrip('/')}/{name}", render(spec), spec.fps)
    return {"file": name, **spec.attributes(), "short_caption": spec.short_caption(),
            "caption": spec.caption()}


def write_captions(out_dir: str, records: list[dict]) -> str:
    """Write `records` as `out_dir/captions.jsonl` (one JSON object a line, sorted by file)."""
    import fsspec

    path = f"{out_dir.rstrip('/')}/captions.jsonl"
    lines = [json.dumps(r, sort_keys=False) for r in sorted(records, key=lambda r: r["file"])]
    if "://" not in path:
        os.makedirs(out_dir, exist_ok=True)
    with fsspec.open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def synth_dataset(out_dir: str, n: int, seed: int,
                  progress: Callable[[int, int], None] | None = None, *,
                  ranges: ClipRanges = DEFAULT_RANGES, hold_out: bool = True) -> list[dict]:
    """Write `n` clips (clip_000000.mp4 ...) and captions.jsonl to `out_dir`; return the records.

    Same (n, seed, ranges) => identical bytes, and clip i does not depend on n.
    hold_out: keep `held_out_combinations()` out of every clip (training data must).
    progress: called as progress(done, n) after each clip.
    """
    assert n >= 0, f"n must be >= 0, got {n}"
    if "://" not in out_dir:
        os.makedirs(out_dir, exist_ok=True)
    exclude = held_out_combinations() if hold_out else None
    records = []
    for i in range(n):
        records.append(synth_clip(out_dir, seed, i, ranges=ranges, exclude=exclude))
        if progress is not None:
            progress(i + 1, n)
    write_captions(out_dir, records)
    return records

