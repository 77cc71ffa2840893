"""Near-duplicate signatures: the same footage at another size, bitrate or container has nearly
the same signature; other footage does not.

A signature is the 64-bit perceptual hash (pHash: Zauner, "Implementation and Benchmarking of
Perceptual Image Hash Functions", 2010) of a few frames taken at fixed fractions of a clip's
length. pHash keeps the signs of the lowest 8x8 DCT coefficients of a 32x32 grey image
against their median, so it survives scaling, re-compression and small colour shifts. Two
clips match when their frame hashes differ in at most `max_bits` of 64 bits on average.

A signature is a hex string (16 hex digits per frame), so it fits a Parquet string column.
"""

from __future__ import annotations

import numpy as np

FRACTIONS = (0.1, 0.37, 0.63, 0.9)  # where in a clip the hashed frames sit
MAX_BITS = 10.0  # mean differing bits per frame hash (of 64) for a match


def sample_positions(start: int, num_frames: int, fractions: tuple[float, ...] = FRACTIONS) -> list[int]:
    """The frame numbers to hash for a clip [start, start + num_frames)."""
    return [start + min(num_frames - 1, int(f * num_frames)) for f in fractions]


def phash(frame: np.ndarray) -> int:
    """64-bit perceptual hash of an (H, W, 3) uint8 RGB frame."""
    from PIL import Image
    from scipy.fft import dctn

    grey = Image.fromarray(np.asarray(frame)).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    coeffs = dctn(np.asarray(grey, np.float64), type=2, norm="ortho")[:8, :8]
    bits = (coeffs > np.median(coeffs.ravel()[1:])).ravel()  # the median leaves out the DC term
    return int("".join("1" if b else "0" for b in bits), 2)


def signature(frames: np.ndarray) -> str:
    """The signature of a clip from its hashed frames (K, H, W, 3): 16 hex digits per frame."""
    frames = np.asarray(frames)
    assert frames.ndim == 4 and frames.shape[-1] == 3 and len(frames), \
        f"frames must be (K, H, W, 3) with K >= 1, got {frames.shape}"
    return "".join(f"{phash(f):016x}" for f in frames)


def distance(a: str, b: str) -> float:
    """Mean number of differing bits per frame hash between two signatures (0..64)."""
    if len(a) != len(b) or len(a) % 16:
        raise ValueError(f"signatures of different lengths ({len(a)} and {len(b)} hex digits) cannot be compared")
    diffs = [bin(int(a[i:i + 16], 16) ^ int(b[i:i + 16], 16)).count("1") for i in range(0, len(a), 16)]
    return float(np.mean(diffs))


def is_duplicate(a: str, b: str, max_bits: float = MAX_BITS) -> bool:
    """Whether two signatures come from the same footage."""
    return distance(a, b) <= max_bits
