"""Black-bar detection: bars are cropped, black backgrounds and dark scenes are not."""

from __future__ import annotations

import numpy as np
import pytest

from footage import letterbox, scene
from media import moving_box
from sora.curation.letterbox import content_box, scale_box


@pytest.mark.parametrize("inner, outer, box", [
    ((192, 80), (192, 108), (0, 14, 192, 94)),  # 2.39:1 letterboxed in 16:9
    ((96, 72), (128, 72), (16, 0, 112, 72)),  # 4:3 pillarboxed in 16:9
    ((100, 60), (128, 72), (14, 6, 114, 66)),  # windowbox: bars on all four sides
    ((128, 72), (128, 72), (0, 0, 128, 72)),  # no bars
])
def test_bars_are_found_exactly(inner, outer, box):
    frames = letterbox(scene(*inner, 4, seed=1), *outer)
    assert content_box(frames) == box


def test_compression_noise_in_the_bars_is_still_black():
    frames = letterbox(scene(192, 80, 4, seed=2), 192, 108).astype(np.int16)
    frames[:, :14] += np.random.default_rng(0).integers(0, 12, frames[:, :14].shape, dtype=np.int16)
    assert content_box(frames.astype(np.uint8)) == (0, 14, 192, 94)


def test_objects_on_black_backgrounds_are_not_cropped():
    """A box crossing a black frame leaves black rows above and below it in every frame, but no
    picture edge: those rows are background, not bars (the shapes world has black scenes)."""
    assert content_box(moving_box(160, 90, 12)) == (0, 0, 160, 90)
    assert content_box(moving_box(90, 160, 12)) == (0, 0, 90, 160)


def test_black_frames_and_dark_scenes_keep_the_whole_picture():
    assert content_box(np.zeros((3, 72, 128, 3), np.uint8)) == (0, 0, 128, 72)
    dark = (scene(128, 72, 3, seed=3) // 12).astype(np.uint8)  # a night scene: all below ~20
    assert content_box(dark) == (0, 0, 128, 72)


def test_a_row_lit_in_one_frame_is_content():
    frames = letterbox(scene(192, 80, 4, seed=4), 192, 108)
    frames[2, 5:14] = 200  # a caption that rises into the top "bar" in one frame
    assert content_box(frames)[1] == 5


def test_scale_box_moves_inner_edges_inward_to_even_pixels():
    assert scale_box((0, 7, 96, 47), (96, 54), (192, 108)) == (0, 14, 192, 94)
    assert scale_box((0, 7, 96, 47), (96, 54), (191, 107)) == (0, 14, 191, 92)  # odd outer sides stay
    assert scale_box((0, 0, 64, 36), (64, 36), (127, 71)) == (0, 0, 127, 71)
