"""Aspect-ratio buckets: map any (width, height, frames) to a native-aspect training size.

Sora trains on video at its native aspect ratio (no square crops). A batch still needs
sizes the model can consume, so every clip is assigned a *bucket*:

- sides are multiples of ``stride`` (VAE spatial compression x DiT patch size, 8 x 2 = 16);
- the bucket's aspect ratio is within a small tolerance of the source's (searched over
  many candidate heights, so the error is usually well under 1%);
- the frame count has the form 4k + 1 (the causal VAE encodes the first frame on its own,
  then groups of 4), capped by the resolution class's maximum;
- the area is at most the resolution class's pixel budget (we never upscale past the class).

The bucket keeps the source's aspect within tolerance, so turning a clip into its bucket
size is a resize plus a crop of at most ``tolerance`` of one side - never a square crop.

    >>> b = assign_bucket(1920, 1080, 300)
    >>> (b.width, b.height, b.num_frames, b.resolution)
    (1936, 1088, 129, '1080p')
    >>> assign_bucket(1080, 1920, 40).key           # 9:16 stays 9:16
    '1080p/1088x1936x37'

How close the aspect ratio can be depends on the size: with stride 16 the width can only
move in steps of 16, so the error is bounded by ``stride / short side`` (about half that in practice) -
under 1% from 720p up, a few percent at 144p, up to ~9% at the tiny 64p class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Resolution classes: name -> (pixel budget as the area of a 16:9 frame of that height,
# maximum frames). The small classes exist because the shapes world trains on a CPU.
RESOLUTIONS: dict[str, tuple[int, int]] = {
    "64p": (114 * 64, 33),
    "96p": (170 * 96, 33),
    "144p": (256 * 144, 49),
    "240p": (426 * 240, 65),
    "360p": (640 * 360, 97),
    "480p": (854 * 480, 121),
    "720p": (1280 * 720, 129),
    "1080p": (1920 * 1080, 129),
}


@dataclass(frozen=True)
class Bucket:
    """A training size: ``width`` x ``height`` pixels, ``num_frames`` frames (4k+1)."""

    width: int
    height: int
    num_frames: int
    resolution: str  # the resolution class, e.g. "240p"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def key(self) -> str:
        """A stable string id, used as the ``bucket`` column of the clips table."""
        return f"{self.resolution}/{self.width}x{self.height}x{self.num_frames}"

    @staticmethod
    def from_key(key: str) -> "Bucket":
        resolution, size = key.split("/")
        w, h, t = (int(v) for v in size.split("x"))
        return Bucket(w, h, t, resolution)

    def latent_shape(self, temporal: int = 4, spatial: int = 8) -> tuple[int, int, int]:
        """(T', H', W') after a causal VAE with the given compression."""
        return (1 + (self.num_frames - 1) // temporal, self.height // spatial, self.width // spatial)


def frames_4k1(num_frames: int, max_frames: int | None = None) -> int:
    """The largest 4k+1 <= num_frames (and <= max_frames). 1 frame (an image) is allowed."""
    if num_frames < 1:
        raise ValueError(f"a clip needs at least 1 frame, got {num_frames}")
    n = num_frames if max_frames is None else min(num_frames, max_frames)
    return 1 + 4 * ((n - 1) // 4)


def resolution_class(width: int, height: int, classes: dict[str, tuple[int, int]] = RESOLUTIONS) -> str:
    """The largest class whose pixel budget the source fills (no upscaling past a class).

    Sources smaller than the smallest class get the smallest class (a small upscale is
    unavoidable there)."""
    area = width * height
    names = sorted(classes, key=lambda n: classes[n][0])
    chosen = names[0]
    for name in names:
        if classes[name][0] <= area * 1.0001:
            chosen = name
    return chosen


def fit_size(aspect: float, area: int, stride: int = 16) -> tuple[int, int]:
    """Sides (width, height), multiples of ``stride``, with width*height <= area (+2%), whose
    aspect ratio is closest to ``aspect``, trading a little accuracy for area.

    We scan candidate heights around the ideal one rather than rounding once: rounding
    a single height to the stride can cost several percent of aspect on small sizes,
    while a neighbouring height often matches to a fraction of a percent."""
    if aspect <= 0 or area < stride * stride:
        raise ValueError(f"cannot fit aspect {aspect} into area {area} with stride {stride}")
    area = int(area * 1.02)  # 2% slack, so that e.g. 1920x1080 maps to 1920x1088, not 1904x1072
    ideal_h = math.sqrt(area / aspect)
    best: tuple[float, int, int] | None = None
    h_hi = max(stride, int(ideal_h // stride) * stride)
    h_lo = max(stride, h_hi - 8 * stride)  # accept up to ~8 strides smaller for a better aspect
    for h in range(h_lo, h_hi + stride, stride):
        w_max = (area // h) // stride * stride
        if w_max < stride:
            continue
        # the best width for this height, not exceeding the budget
        w = min(w_max, max(stride, round(aspect * h / stride) * stride))
        err = abs(math.log((w / h) / aspect))
        # Trade aspect accuracy against area: 1% of aspect error costs as much as 20% of
        # the pixel budget. Pure accuracy would shrink 426x240 to 256x144 for 0.1%.
        score = err + 0.05 * (1.0 - w * h / area)
        if best is None or score < best[0]:
            best = (score, w, h)
    assert best is not None, "no candidate size found"
    return best[1], best[2]


def assign_bucket(
    width: int,
    height: int,
    num_frames: int,
    *,
    stride: int = 16,
    classes: dict[str, tuple[int, int]] = RESOLUTIONS,
    resolution: str | None = None,
) -> Bucket:
    """Map a source (width, height, num_frames) to its training bucket.

    ``resolution`` forces a class (e.g. everything at "144p" for the CPU shapes world);
    otherwise the class is the largest one the source fills."""
    if width <= 0 or height <= 0:
        raise ValueError(f"bad size {width}x{height}")
    name = resolution or resolution_class(width, height, classes)
    if name not in classes:
        raise ValueError(f"unknown resolution class {name!r}; known: {sorted(classes)}")
    area, max_frames = classes[name]
    w, h = fit_size(width / height, area, stride)
    return Bucket(w, h, frames_4k1(num_frames, max_frames), name)


def aspect_error(bucket: Bucket, width: int, height: int) -> float:
    """Relative aspect-ratio error of the bucket w.r.t. the source (0.01 = 1%)."""
    return abs(bucket.aspect / (width / height) - 1.0)
