"""train-captioner: trains on sidecar captions, scores held-out clips, recaptions through the
same `sora caption` actor-pool path (model loaded once per actor), and recaptions win in encode."""

from __future__ import annotations

import shutil

from pipelines.caption import best_captions, read_captions
from pipelines.ingest import read_clips
from pipelines.train_captioner import run_train_captioner


def test_train_then_recaption_everything(shapes_ds, tmp_path, ray_session):
    data = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, data)
    out = str(tmp_path / "captioner")
    summary = run_train_captioner(data, out, max_minutes=0.1, holdout=4, recaption=True, workers=2)
    assert summary["heldout_clips"] == 4 and summary["train"]["workers"] == 2
    assert set(summary["accuracy"]) == {"color", "shape", "motion"}
    assert summary["train"]["steps"] > 0
    n = read_clips(data).num_rows
    rec = summary["recaption"]
    assert rec["captioned"] == n and rec["failed"] == 0
    # the default pool (one actor per CPU), one model load each, several batches
    assert len(rec["actors"]) == 2 and set(rec["model_loads_per_actor"].values()) == {1}
    caps = read_captions(data)
    model_rows = [w for w in caps["captioner"].to_pylist() if not w.startswith("sidecar:")]
    assert len(model_rows) == n
    best = best_captions(data)
    by_clip = {c: (t, w) for c, t, w in zip(caps["clip_id"].to_pylist(), caps["caption"].to_pylist(),
                                            caps["captioner"].to_pylist()) if not w.startswith("sidecar:")}
    assert all(best[c] == by_clip[c][0] for c in best)
