"""Frames of a clip as one image: evenly sampled frames laid out as a grid, or woven together."""

from __future__ import annotations

import math

import numpy as np
import torch

def sample_frame_indices(num_frames: int, k: int) -> np.ndarray:
    """k frame indices spread evenly over a clip of num_frames, first and last included (so the
    whole motion is seen). k == 1 takes the middle frame; k > num_frames repeats frames.

    Returns (k,) int64, non-decreasing, in [0, num_frames)."""
    assert num_frames >= 1, f"a clip needs at least one frame, got {num_frames}"
    assert k >= 1, f"k must be >= 1, got {k}"
    if k == 1:
        return np.array([(num_frames - 1) // 2], dtype=np.int64)
    return np.rint(np.linspace(0, num_frames - 1, k)).astype(np.int64)


def grid_shape(k: int) -> tuple[int, int]:
    """(rows, cols) of the grid holding k frames: as square as possible, cols >= rows."""
    cols = math.ceil(math.sqrt(k))
    return math.ceil(k / cols), cols


LAYOUTS = ("grid", "interleave", "interleave+key")  # see `frame_grid`


def frame_grid(frames: np.ndarray, k: int = 4, max_tile: int | None = 224, layout: str = "grid",
               tile: tuple[int, int] | None = None) -> np.ndarray:
    """Put k evenly sampled frames of a clip into one image.

    Args:
        frames: (T, H, W, 3) uint8.
        k: frames to show, on a `grid_shape(k)` = (rows, cols) layout; missing frames are black.
        max_tile: frames whose longer side exceeds this are first shrunk (aspect kept) so a 4K
            clip does not make a 4K grid; None keeps them as they are.
        layout: "grid": frame i is the tile at (i // cols, i % cols), time order left to right
            then top to bottom, what a general VLM can read. "interleave": every pixel becomes a
            rows x cols block holding that pixel in each of the k frames (a pixel-unshuffle of
            the frames), so the motion at a place is visible inside one small patch; for our
            own captioner, whose patch embedding learns to read it. "interleave+key": the
            interleaved image with the first sampled frame alone, at the interleaved image's
            size (rows x cols times the tile's pixels), to its right: motion from the left
            half, the look of things (shape) from a frame that no other frame overlaps.
        tile: (h, w) to resize every frame to first (overrides max_tile). The interleaved image
            must reach the model at exactly its input size: a resize would mix the frames.
    Returns:
        (rows * h, cols * w, 3) uint8 where (h, w) is the (possibly resized) frame size;
        (rows * h, 2 * cols * w, 3) for "interleave+key".
    """
    assert frames.ndim == 4 and frames.shape[-1] == 3, f"frames must be (T, H, W, 3), got {frames.shape}"
    assert frames.dtype == np.uint8, f"frames must be uint8, got {frames.dtype}"
    assert layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {layout!r}"
    picked = frames[sample_frame_indices(frames.shape[0], k)]  # (k, H, W, 3)
    key = picked[0]  # (H, W, 3), resized below from the full frame, not from its tile
    h, w = picked.shape[1:3]
    if tile is not None:
        h, w = tile
    elif max_tile is not None and max(h, w) > max_tile:
        s = max_tile / max(h, w)
        h, w = max(1, round(h * s)), max(1, round(w * s))
    if (h, w) != picked.shape[1:3]:
        picked = np.stack([_resize(f, h, w) for f in picked])
    rows, cols = grid_shape(k)
    cells = np.zeros((rows * cols, h, w, 3), dtype=np.uint8)
    cells[:k] = picked
    cells = cells.reshape(rows, cols, h, w, 3)
    if layout == "grid":
        return cells.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)  # (r, y, c, x)
    woven = cells.transpose(2, 0, 3, 1, 4).reshape(h * rows, w * cols, 3)  # (y, r, x, c)
    if layout == "interleave":
        return woven
    return np.concatenate([woven, _resize(key, rows * h, cols * w)], axis=1)  # (rows*h, 2*cols*w, 3)


def _resize(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear (a stretch when the aspect changes)."""
    if frame.shape[:2] == (h, w):
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR))


def flip_grid(pixels: torch.Tensor, k: int, layout: str) -> torch.Tensor:
    """Mirror every frame of frame-grid images left-right, keeping the layout and time order.

    A plain flip of the whole image would also reverse the frame order along each row: in
    "grid" the tiles of a row, in "interleave" the column phase of each pixel block (frame 0
    would land where frame 1 belongs, so motion would run backwards). Flipping back that one
    axis undoes it. "interleave+key": each half on its own (the key frame is a plain picture).
    pixels (..., S, W) with W = S (2 S for "interleave+key") and S = rows * h = cols * w;
    returns the same shape."""
    if layout == "interleave+key":
        woven, key = pixels.chunk(2, dim=-1)
        return torch.cat([flip_grid(woven, k, "interleave"), key.flip(-1)], dim=-1)
    rows, cols = grid_shape(k)
    W = pixels.shape[-1]
    assert W % cols == 0, f"width {W} is not a multiple of the grid's {cols} columns"
    x = pixels.flip(-1)
    if layout == "interleave":  # (..., W/cols, cols): flip the phase back
        return x.unflatten(-1, (W // cols, cols)).flip(-1).flatten(-2)
    assert layout == "grid", f"unknown layout {layout!r}"
    return x.unflatten(-1, (cols, W // cols)).flip(-2).flatten(-2)  # (..., cols, w): tiles back in order
