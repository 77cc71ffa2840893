"""Bucket properties over thousands of random sizes: native aspect kept, strides respected."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sora.buckets import RESOLUTIONS, Bucket, aspect_error, assign_bucket, fit_size, frames_4k1

sizes = st.tuples(st.integers(16, 4096), st.integers(16, 4096), st.integers(1, 2000)).filter(
    lambda s: max(s[0] / s[1], s[1] / s[0]) <= 4.0
)


@settings(max_examples=3000, deadline=None)
@given(sizes)
def test_bucket_properties_hold_for_random_sizes(size):
    w, h, t = size
    b = assign_bucket(w, h, t)
    budget, max_frames = RESOLUTIONS[b.resolution]
    # strides respected
    assert b.width % 16 == 0 and b.height % 16 == 0, b
    # frames 4k+1, never more than the source has, never more than the class allows
    assert (b.num_frames - 1) % 4 == 0 and 1 <= b.num_frames <= min(t, max_frames), b
    # area within the class budget (2% slack, documented)
    assert b.width * b.height <= budget * 1.02, b
    # native aspect kept: the error is bounded by one stride step of the short side ...
    assert aspect_error(b, w, h) <= 16 / min(b.width, b.height), (w, h, b)
    # ... which is small for real resolutions: under 3% from 240p up
    if budget >= RESOLUTIONS["240p"][0]:
        assert aspect_error(b, w, h) <= 0.03, (w, h, b)
    # orientation never flips (no square crops of non-square input), wherever the stride
    # granularity can tell landscape from portrait at all
    step = 16 / min(b.width, b.height)
    if w / h > 1 + 2 * step:
        assert b.width > b.height, (w, h, b)
    if h / w > 1 + 2 * step:
        assert b.height > b.width, (w, h, b)


@pytest.mark.parametrize(
    "w,h,expected_aspect",
    [(1080, 1920, 9 / 16), (1920, 1080, 16 / 9), (2390, 1000, 2.39), (1000, 2390, 1 / 2.39), (640, 480, 4 / 3)],
)
def test_named_aspect_ratios_stay_native(w, h, expected_aspect):
    b = assign_bucket(w, h, 33)
    assert abs(b.aspect / expected_aspect - 1) < 0.01, b


def test_9x16_and_239_stay_native_at_small_classes():
    # the shapes world trains at small sizes; the orientation and ratio must survive there too
    b = assign_bucket(144, 256, 17, resolution="144p")
    assert b.height > b.width and abs(b.aspect / (9 / 16) - 1) < 0.05, b
    b = assign_bucket(344, 144, 17, resolution="144p")
    assert abs(b.aspect / 2.39 - 1) < 0.05, b


def test_frames_4k1():
    assert [frames_4k1(n) for n in (1, 2, 4, 5, 8, 9, 10, 17)] == [1, 1, 1, 5, 5, 9, 9, 17]
    assert frames_4k1(300, max_frames=65) == 65
    with pytest.raises(ValueError):
        frames_4k1(0)


def test_key_round_trip_and_latent_shape():
    b = assign_bucket(1280, 720, 200)
    assert Bucket.from_key(b.key) == b
    assert b.latent_shape() == (1 + (b.num_frames - 1) // 4, b.height // 8, b.width // 8)


def test_fit_size_exact_when_possible():
    assert fit_size(16 / 9, 1280 * 720) == (1280, 720)
    assert fit_size(1.0, 256 * 256) == (256, 256)
    assert math.isclose(fit_size(4 / 3, 512 * 384)[0] / fit_size(4 / 3, 512 * 384)[1], 4 / 3)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="bad size"):
        assign_bucket(0, 100, 10)
    with pytest.raises(ValueError, match="unknown resolution"):
        assign_bucket(100, 100, 10, resolution="8k")
