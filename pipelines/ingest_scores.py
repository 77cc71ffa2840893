"""The model-backed steps of ingest: TransNetV2 shot detection and the per-clip scores (on-screen
text, aesthetic, near-duplicate signature) as columns of `clips`.

Each is a map stage on the `pipelines.stage.Stage` base class: `setup` loads its models once
per process (a Ray actor of the ingest pool, or the sequential loop; `loads_in_process` counts
them), and it maps a source's state to the same state with columns added - the clips of its
shots (`ShotSplit`), or each clip's scores (`ClipScores`). `apply_to` works on the state in
this process (how ingest chains them with its plain stages); as Ray Data rows (`process_item`)
a state travels as JSON in a "state" column. Per-clip failures are recorded in the state's
quarantine rows, never raised. The functions that do the work (`pipelines.ingest.split_stage`,
`score_stage`) take the loaded models as arguments, so they run the same under either driver.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pipelines.ingest_config import IngestConfig
from pipelines.stage import Stage, loads_in_process


class _SourceMapStage(Stage):
    """A map stage over a source's state (see the module docstring)."""

    config_cls = IngestConfig

    def apply_to(self, state: dict) -> dict:
        """Map one source's state in this process (adds columns) and note the model loads."""
        self.map_state(state)
        state.setdefault("models", {})[type(self).__name__] = {"pid": os.getpid(), "loads": loads_in_process(self.name)}
        return state

    def map_state(self, state: dict) -> None:
        raise NotImplementedError

    def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        return {**item, "state": json.dumps(self.apply_to(json.loads(item["state"])))}


class ShotSplit(_SourceMapStage):
    """The split stage with TransNetV2 (cfg.shots == "transnetv2"): adds the clips of the shots."""

    name = "split"

    def setup(self) -> None:
        from sora.curation.transnetv2 import TransNetV2

        self.model = TransNetV2.from_weights().to(self.device)

    def map_state(self, state: dict) -> None:
        from pipelines.ingest import split_stage

        split_stage(state, self.cfg, shot_model=self.model)


class ClipScores(_SourceMapStage):
    """The score stage with the models the config asks for, loaded once: PP-OCR when
    cfg.score_text, CLIP when cfg.clip_model. Adds text_area, aesthetic, signature to each clip."""

    name = "score"

    def setup(self) -> None:
        self.text = self.clip = None
        if self.cfg.score_text:
            from sora.curation.text import TextDetector

            self.text = TextDetector()
        if self.cfg.clip_model:
            from sora.curation.clip_scores import ClipScorer

            self.clip = ClipScorer(self.cfg.clip_model, device=self.device)
            if self.clip.head is None:
                raise FileNotFoundError(f"{self.cfg.clip_model} has no aesthetic_head.safetensors: "
                                        "add one (sora.curation.clip_scores.save_aesthetic_head)")

    def map_state(self, state: dict) -> None:
        from pipelines.ingest import score_stage

        score_stage(state, self.cfg, scorers=self)


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
