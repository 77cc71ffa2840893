"""Shot boundaries from frames: the frame-difference rule (fast, hard cuts only), and helpers
that turn detected transitions into shots. The pretrained detector is `sora.curation.transnetv2`.

Shapes: frames are (T, H, W, 3) uint8 RGB; shots and transitions are half-open frame ranges
[start, end).
"""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------------------------
# The frame-difference rule (fast, hard cuts only)
# --------------------------------------------------------------------------------------------


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference of consecutive frames in [0, 1]: (T, H, W, 3) -> (T-1,)."""
    f = frames.astype(np.float32) / 255.0
    return np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3)) if len(f) > 1 else np.zeros(0, np.float32)


def find_shots(diffs: np.ndarray, indices: np.ndarray, num_frames: int, threshold: float) -> list[tuple[int, int]]:
    """Shots [start, end) in source frames, cut where the analysed difference jumps.

    `indices` are the source frames that were analysed (a stride on long videos); a cut
    between analysed frames i and i+1 starts the new shot at source frame indices[i+1]."""
    starts = [0] + [int(indices[i + 1]) for i in np.nonzero(diffs >= threshold)[0]]
    ends = starts[1:] + [num_frames]
    return [(s, e) for s, e in zip(starts, ends) if e > s]


def shots_between(transitions: list[tuple[int, int]], num_frames: int) -> list[tuple[int, int]]:
    """Shots [start, end) between `transitions` [start, end): the frames of a transition (a
    cut's last frame, every frame of a dissolve or fade) belong to no shot, so a clip cut from
    a shot never spans one."""
    shots, at = [], 0
    for s, e in sorted(transitions):
        if s > at:
            shots.append((at, s))
        at = max(at, e)
    if at < num_frames:
        shots.append((at, num_frames))
    return shots


def transitions_from_probabilities(probs: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int]]:
    """The transitions themselves: runs [start, end) of frames above `threshold`."""
    above = np.asarray(probs) > threshold
    runs, start = [], None
    for i, on in enumerate(above):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(above)))
    return runs
