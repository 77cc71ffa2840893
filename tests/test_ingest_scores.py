"""Curation scores in ingest: TransNetV2 shots, on-screen text, aesthetic and near-duplicate
signatures become columns of clips (null where a scorer did not run); thresholds quarantine;
each model loads once per process or Ray actor."""

from __future__ import annotations

import os

import numpy as np
import pytest

from footage import scene, tiny_clip_dir, transition_video, with_subtitle, with_watermark, write_clip
from pipelines.ingest import IngestConfig, read_clips, read_quarantine, run_ingest, run_sequential


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("texts")
    frames = scene(320, 180, 24, seed=51)
    # the same bytes every run (x264 with threads or B-frames is not), so the signature
    # distances below are fixed figures: subtitled 8.5 and watermarked 2.5 bits from clean
    exact = {"x264-params": "threads=1:bframes=0"}
    write_clip(str(root / "clean.mp4"), frames, 24, options=exact)
    write_clip(str(root / "subtitled.mp4"), with_subtitle(frames), 24, options=exact)
    write_clip(str(root / "watermarked.mp4"), with_watermark(frames), 24, options=exact)
    return str(root)


def by_name(table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        out.setdefault(os.path.basename(row["source"]), []).append(row)
    return out


def test_subtitled_and_watermarked_clips_are_quarantined(texts, tmp_path):
    pytest.importorskip("rapidocr")
    data = str(tmp_path / "ds")
    run_sequential([texts], data, IngestConfig(score_text=True))
    clips, quarantine = by_name(read_clips(data)), by_name(read_quarantine(data))
    assert set(clips) == {"clean.mp4"} and set(quarantine) == {"subtitled.mp4", "watermarked.mp4"}
    for rows in quarantine.values():
        assert all(r["stage"] == "score" and r["reason"].startswith("on-screen text: covers") for r in rows)
    clean = clips["clean.mp4"][0]
    assert 0 <= clean["text_area"] < IngestConfig().max_text_area
    assert clean["aesthetic"] is None  # no CLIP model: null, never a made-up value
    assert len(clean["signature"]) == 64 and int(clean["signature"], 16) >= 0


def test_defaults_leave_model_columns_null_and_sign_every_clip(texts, tmp_path):
    data = str(tmp_path / "ds")
    run_sequential([texts], data, IngestConfig())
    rows = read_clips(data).to_pylist()
    assert len(rows) == 3 and all(r["text_area"] is None and r["aesthetic"] is None for r in rows)
    assert all(r["shot_detector"] == "diff" and len(r["signature"]) == 64 for r in rows)
    # burnt-in text changes a few pixels, not the footage: the signatures still match
    from sora.curation.dedup import is_duplicate

    sigs = {os.path.basename(r["source"]): r["signature"] for r in rows}
    assert all(is_duplicate(sigs["clean.mp4"], sigs[name]) for name in ("subtitled.mp4", "watermarked.mp4")), sigs


def test_aesthetic_on_ray_loads_clip_once_per_actor(texts, tmp_path, ray_session):
    model = tiny_clip_dir(str(tmp_path / "clip"))
    data = str(tmp_path / "ds")
    cfg = IngestConfig(clip_model=model, min_aesthetic=-100.0)
    first = run_ingest([texts], data, cfg)
    rows = read_clips(data).to_pylist()
    assert len(rows) == 3 and all(isinstance(r["aesthetic"], float) for r in rows)
    from sora.curation.clip_scores import ClipScorer
    from sora.video_io import read_frames
    from sora.curation.dedup import sample_positions

    r = rows[0]  # the column is CLIP's score of the clip's sampled frames
    frames = read_frames(r["source"], sample_positions(r["start_frame"], r["num_frames"]),
                         crop=(r["crop_x"], r["crop_y"], r["crop_x"] + r["crop_width"], r["crop_y"] + r["crop_height"]))
    assert r["aesthetic"] == pytest.approx(ClipScorer(model).aesthetic(frames), abs=1e-4)
    summaries = [__import__("json").load(open(os.path.join(data, "_done", n))) for n in os.listdir(os.path.join(data, "_done"))]
    loads = {s["models"]["ClipScores"]["pid"]: s["models"]["ClipScores"]["loads"] for s in summaries}
    assert all(v == 1 for v in loads.values()) and 1 <= len(loads) <= 2, loads
    again = run_ingest([texts], data, cfg)  # a re-run adds no rows
    assert again["sources_skipped_already_done"] == 3 and read_clips(data).num_rows == first["clips"]
    strict = str(tmp_path / "strict")  # a threshold above every score quarantines every clip
    run_ingest([texts], strict, IngestConfig(clip_model=model, min_aesthetic=100.0))
    assert read_clips(strict).num_rows == 0
    assert all("low aesthetic score" in q for q in read_quarantine(strict)["reason"].to_pylist())


def test_transnetv2_shots_never_span_a_dissolve(tmp_path):
    frames, truth = transition_video("dissolve", 2, seed=52, shot_frames=(40, 48), span=(14, 18))
    src = str(tmp_path / "dissolves.mp4")
    write_clip(src, frames, 24)
    data = str(tmp_path / "ds")
    run_sequential([src], data, IngestConfig(shots="transnetv2", signatures=False))
    clips = read_clips(data).to_pylist()
    assert len(clips) == 3 and all(c["shot_detector"] == "transnetv2" for c in clips)
    for c in clips:
        for s, e in truth:  # no clip holds the inner frames of a dissolve
            inner = set(range(s + 2, e - 2))
            assert not inner & set(range(c["start_frame"], c["start_frame"] + c["num_frames"])), (c, s, e)
    diff = str(tmp_path / "diff")  # the frame-difference rule sees no cut at all here
    run_sequential([src], diff, IngestConfig(signatures=False))
    assert read_clips(diff).num_rows == 1 or read_clips(diff)["num_frames"].to_pylist()[0] > truth[0][1]


def test_a_missing_clip_model_is_one_clear_error_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="clip_model .* is not a directory"):
        IngestConfig(clip_model=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="min_aesthetic needs clip_model"):
        IngestConfig(min_aesthetic=0.5)
    assert np.isfinite(IngestConfig().max_text_area)
