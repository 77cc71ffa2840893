"""The model-backed steps of ingest: TransNetV2 shot detection and the per-clip scores (on-screen
text, aesthetic, near-duplicate signature) as columns of `clips`.

Each is a callable class in the shape of Ray's batch-inference guide (and of a stage base
class): the constructor loads the models once per process (a Ray actor, or the sequential
loop), `__call__` maps one row (one source's state) and records per-clip errors instead of
raising. The functions that do the work (`pipelines.ingest.split_stage`, `score_stage` here)
take the loaded models as arguments, so they run the same under either driver.
"""

from __future__ import annotations

import json
import os

from pipelines.ingest_config import IngestConfig


def _config(cfg: IngestConfig | dict) -> IngestConfig:
    return cfg if isinstance(cfg, IngestConfig) else IngestConfig(**cfg)


def _note_loads(row: dict, name: str, loads: int) -> dict:
    """Record in the row which process ran stage `name` and how many times it loaded its
    models there (the source's summary carries it: one load per actor is the contract)."""
    state = json.loads(row["state"])
    state.setdefault("models", {})[name] = {"pid": os.getpid(), "loads": loads}
    return {"state": json.dumps(state)}


class ShotSplit:
    """The split stage with TransNetV2 (cfg.shots == "transnetv2"), its model loaded once."""

    loads = 0  # models loaded in this process (a test counts them per actor)

    def __init__(self, cfg: IngestConfig | dict):
        import torch

        from sora.curation.transnetv2 import TransNetV2

        self.cfg = _config(cfg)
        torch.set_num_threads(1)  # one Ray CPU per actor
        self.model = TransNetV2.from_weights()
        type(self).loads += 1

    def __call__(self, row: dict) -> dict:
        from pipelines.ingest import split_stage

        return _note_loads(split_stage(row, self.cfg, shot_model=self.model), "ShotSplit", type(self).loads)


class ClipScores:
    """The score stage with the models the config asks for, loaded once: PP-OCR when
    cfg.score_text, CLIP when cfg.clip_model. Signatures need no model."""

    loads = 0

    def __init__(self, cfg: IngestConfig | dict):
        self.cfg = _config(cfg)
        self.text = self.clip = None
        if self.cfg.score_text:
            from sora.curation.text import TextDetector

            self.text = TextDetector()
        if self.cfg.clip_model:
            from sora.curation.clip_scores import ClipScorer

            self.clip = ClipScorer(self.cfg.clip_model)
            if self.clip.head is None:
                raise FileNotFoundError(f"{self.cfg.clip_model} has no aesthetic_head.safetensors: "
                                        "add one (sora.curation.clip_scores.save_aesthetic_head)")
        type(self).loads += 1

    def __call__(self, row: dict) -> dict:
        from pipelines.ingest import score_stage

        return _note_loads(score_stage(row, self.cfg, scorers=self), "ClipScores", type(self).loads)


def needs_models(cfg: IngestConfig) -> bool:
    """Whether the score stage loads any model (else it runs as a plain function)."""
    return bool(cfg.score_text or cfg.clip_model)


def score_clip(source_path: str, clip: dict, cfg: IngestConfig, scorers: ClipScores | None) -> dict:
    """The score columns of one clip from 4 frames at fixed fractions of it, read inside its
    content box at up to `cfg.bar_short_side`: {"text_area", "aesthetic", "signature"}
    (None where that scorer did not run)."""
    from sora.curation.dedup import sample_positions, signature
    from sora.video_io import read_frames

    x, y, w, h = clip["crop_x"], clip["crop_y"], clip["crop_width"], clip["crop_height"]
    scale = min(1.0, cfg.bar_short_side / min(w, h))
    size = (max(2, int(round(w * scale))), max(2, int(round(h * scale))))
    frames = read_frames(source_path, sample_positions(clip["start_frame"], clip["num_frames"]), size=size,
                         crop=(x, y, x + w, y + h), timeout=cfg.decode_timeout)
    out = {"text_area": None, "aesthetic": None, "signature": None}
    if cfg.signatures:
        out["signature"] = signature(frames)
    if scorers is not None and scorers.text is not None:
        out["text_area"] = scorers.text.text_area(frames[1:3])  # two frames in the clip's middle
    if scorers is not None and scorers.clip is not None:
        out["aesthetic"] = scorers.clip.aesthetic(frames)
    return out


def threshold_problem(scores: dict, cfg: IngestConfig) -> str | None:
    """The quarantine reason for a clip's scores, or None when it passes every threshold."""
    text, aesthetic = scores.get("text_area"), scores.get("aesthetic")
    if text is not None and text > cfg.max_text_area:
        return (f"on-screen text: covers {100 * text:.1f}% of the frame > {100 * cfg.max_text_area:.1f}% "
                "(subtitles, captions or a watermark)")
    if aesthetic is not None and cfg.min_aesthetic is not None and aesthetic < cfg.min_aesthetic:
        return f"low aesthetic score {aesthetic:.3f} < {cfg.min_aesthetic}"
    return None
