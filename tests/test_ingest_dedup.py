"""Near-duplicates across the dataset: a copy at half size and a low bitrate in another
container is kept once (the larger one), and a later ingest of new copies is matched against
everything ingested before, exactly once."""

from __future__ import annotations

import os

import pytest

from footage import scene, write_clip
from pipelines.ingest import IngestConfig, read_clips, read_quarantine, run_ingest, run_sequential
from sora.video_io import resize_frames, write_video


@pytest.fixture(scope="module")
def footage_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    first, later = root / "first", root / "later"
    first.mkdir(), later.mkdir()
    original = scene(256, 144, 40, seed=61)
    write_clip(str(first / "small_copy.webm"), resize_frames(original, 128, 72), 24, codec="libvpx-vp9",
               options={"crf": "45", "b:v": "0"})
    write_video(str(first / "original.mp4"), original, 24)
    write_video(str(first / "other.mp4"), scene(256, 144, 40, seed=62), 24)
    write_video(str(later / "another_copy.mp4"), resize_frames(original, 192, 108), 24, crf=35)
    write_video(str(later / "new.mp4"), scene(256, 144, 40, seed=63), 24)
    return str(first), str(later)


def names(table, column="source") -> list[str]:
    return sorted(os.path.basename(s) for s in table[column].to_pylist())


def test_copies_are_kept_once_and_later_copies_match_the_index(footage_dirs, tmp_path, ray_session):
    first, later = footage_dirs
    data = str(tmp_path / "ds")
    cfg = IngestConfig(dedup=True)
    summary = run_ingest([first], data, cfg)
    assert summary["dedup"] == {"groups": 1, "duplicates_dropped": 1}
    clips = read_clips(data)
    assert names(clips) == ["original.mp4", "other.mp4"]
    q = read_quarantine(data)
    assert names(q) == ["small_copy.webm"]
    kept_id = next(r["clip_id"] for r in clips.to_pylist() if r["source"].endswith("original.mp4"))
    # the original (the larger of the two) stays; the copy names it
    assert q["stage"].to_pylist() == ["dedup"] and q["reason"][0].as_py().startswith(f"duplicate of {kept_id}")

    again = run_ingest([first, later], data, cfg)  # the new copy is matched against the first run
    assert again["sources_skipped_already_done"] == 3
    assert names(read_clips(data)) == ["new.mp4", "original.mp4", "other.mp4"]
    assert names(read_quarantine(data)) == ["another_copy.mp4", "small_copy.webm"]
    rows = (read_clips(data).num_rows, read_quarantine(data).num_rows)
    run_ingest([first, later], data, cfg)  # exactly once: nothing moves on a re-run
    assert (read_clips(data).num_rows, read_quarantine(data).num_rows) == rows


def test_sequential_dedup_matches_and_is_off_by_default(footage_dirs, tmp_path):
    first, _ = footage_dirs
    plain = str(tmp_path / "plain")
    run_sequential([first], plain, IngestConfig())
    assert read_clips(plain).num_rows == 3  # off by default: the shapes world's clips look alike
    seq = str(tmp_path / "seq")
    summary = run_sequential([first], seq, IngestConfig(dedup=True))
    assert summary["dedup"]["duplicates_dropped"] == 1 and names(read_clips(seq)) == ["original.mp4", "other.mp4"]
    with pytest.raises(ValueError, match="dedup needs signatures"):
        IngestConfig(dedup=True, signatures=False)
