"""Near-duplicate signatures: the same footage re-encoded at half size and a low bitrate in
another container matches; other footage does not."""

from __future__ import annotations

import pytest

from footage import scene, write_clip
from sora.curation.dedup import distance, is_duplicate, phash, sample_positions, signature
from sora.video_io import probe, read_frames, resize_frames, write_video


def clip_signature(path: str) -> str:
    info = probe(path)
    return signature(read_frames(path, sample_positions(0, info.num_frames)))


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("dups")
    original = scene(256, 144, 40, seed=31)
    paths = {"original": str(root / "original.mp4"), "small": str(root / "small_low_bitrate.webm"),
             "other": str(root / "other.mp4"), "other_small": str(root / "other_small.mkv")}
    write_video(paths["original"], original, 24)
    # half size, a low bitrate (crf 45 of 63 for VP9), another container
    write_clip(paths["small"], resize_frames(original, 128, 72), 24, codec="libvpx-vp9",
               options={"crf": "45", "b:v": "0"})
    other = scene(256, 144, 40, seed=32)
    write_video(paths["other"], other, 24)
    write_video(paths["other_small"], resize_frames(other, 128, 72), 24, crf=40)
    return paths


def test_reencoded_copy_matches_other_footage_does_not(copies):
    sig = {k: clip_signature(p) for k, p in copies.items()}
    assert len(sig["original"]) == 64  # 4 frames x 16 hex digits
    assert is_duplicate(sig["original"], sig["small"]), distance(sig["original"], sig["small"])
    assert is_duplicate(sig["other"], sig["other_small"])
    for a, b in (("original", "other"), ("original", "other_small"), ("small", "other")):
        assert not is_duplicate(sig[a], sig[b]), (a, b, distance(sig[a], sig[b]))
    # the margin is wide: copies sit far below the rule, other footage far above it
    assert distance(sig["original"], sig["small"]) < 6 < 20 < distance(sig["original"], sig["other"])


def test_phash_is_a_64_bit_code_stable_under_scaling():
    frame = scene(320, 180, 1, seed=33)[0]
    h = phash(frame)
    assert 0 <= h < 2 ** 64 and 16 <= bin(h).count("1") <= 48  # about half the bits set
    assert bin(h ^ phash(resize_frames(frame[None], 80, 45)[0])).count("1") <= 4


def test_signatures_of_different_lengths_do_not_compare():
    with pytest.raises(ValueError, match="different lengths"):
        distance("0" * 16, "0" * 32)
    assert sample_positions(10, 40) == [14, 24, 35, 46]
