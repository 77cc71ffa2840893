"""`IngestConfig`: the knobs of the ingest pipeline (`pipelines.ingest`).

A module of its own, free of heavy imports, so `sora ingest --help` can list every field as a
flag without loading pyarrow, PyAV or decord.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pipelines.stage import StageResources


@dataclass(kw_only=True)
class IngestConfig(StageResources):
    """Knobs of the ingest pipeline (with `StageResources`: actors, num_gpus, torch_threads).
    Defaults suit real footage; the shapes world sets `min_motion=0` because it contains
    deliberately still objects."""

    # Longest clip in seconds: longer shots are cut into pieces.
    max_clip_seconds: float = 8.0
    # Longest clip in frames: longer shots are cut into pieces.
    max_clip_frames: int = 257
    # Shorter pieces are dropped (quarantined as "too short").
    min_clip_frames: int = 9
    # Sources whose content (inside black bars) has a shorter side, in pixels, are rejected.
    min_side: int = 32
    # Content wider than max_aspect:1 or taller than 1:max_aspect is rejected.
    max_aspect: float = 3.0
    # Mean |frame difference| in [0, 1] below which a clip is near-static and dropped; 0 keeps all.
    min_motion: float = 0.0005
    # Mean |frame difference| in [0, 1] that marks a hard cut between shots.
    scene_threshold: float = 0.12
    # Frames are analysed for cuts and motion at this short side, in pixels.
    analysis_short_side: int = 48
    # Longer videos are analysed at a frame stride so at most this many frames are decoded.
    max_analysis_frames: int = 2048
    # Detect black bars (letterbox/pillarbox) per shot; clips record the content box.
    crop_bars: bool = True
    # Luma (0-255) at or below which a whole row or column counts as a black bar.
    bar_threshold: float = 24.0
    # Frames per shot examined for black bars, decoded at up to `bar_short_side` pixels.
    bar_frames: int = 4
    # Short side, in pixels, of the frames examined for black bars (smaller videos: full size).
    bar_short_side: int = 360
    # Shot detector: "diff" (frame-difference rule, hard cuts only) or "transnetv2" (pretrained, also dissolves and fades).
    shots: Literal["diff", "transnetv2"] = "diff"
    # Measure on-screen text with PP-OCR (column text_area); off leaves the column null.
    score_text: bool = False
    # Clips whose on-screen text covers more of the frame than this share are quarantined.
    max_text_area: float = 0.005
    # Local CLIP model directory with aesthetic_head.safetensors (column aesthetic); none: null.
    clip_model: str | None = None
    # Clips with an aesthetic score below this are quarantined; none keeps all.
    min_aesthetic: float | None = None
    # Near-duplicate signature of every clip (column signature: perceptual hashes of 4 frames).
    signatures: bool = True
    # Keep one clip of the same footage across the dataset (highest resolution, then bitrate); needs signatures.
    dedup: bool = False
    # Mean differing bits per 64-bit frame hash at or below which two clips are the same footage.
    dedup_max_bits: float = 10.0
    # Force a bucket resolution class (e.g. "144p"); none picks one per clip.
    resolution: str | None = None
    # Seconds before a probe (opening a file) is killed and the file quarantined.
    probe_timeout: float = 20.0
    # Seconds before an analysis decode is killed and the file quarantined.
    decode_timeout: float = 120.0
    # Processes working on sources at once (tasks, or actors when a model is on); none: one per cluster CPU.
    actors: int | None = None
    # GPUs per actor for the scorers' models (TransNetV2, CLIP); decoding runs on the CPU.
    num_gpus: float | None = 0.0
    # Each worker and its decode child, which work in turns, share one CPU of the machine while they
    # work on a block (a free one; none free: unpinned); off leaves their placement to the kernel.
    pin_cpu: bool = True

    def __post_init__(self):
        super().__post_init__()
        positive = ("max_clip_seconds", "max_clip_frames", "min_clip_frames", "min_side",
                    "analysis_short_side", "max_analysis_frames", "bar_frames", "bar_short_side",
                    "probe_timeout", "decode_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"IngestConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_aspect < 1:
            raise ValueError(f"IngestConfig.max_aspect must be >= 1 (it bounds both wide and "
                             f"tall), got {self.max_aspect}")
        for name in ("min_motion", "scene_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"IngestConfig.{name} is a mean frame difference in [0, 1], "
                                 f"got {getattr(self, name)}")
        if not 0 <= self.bar_threshold < 255:
            raise ValueError(f"IngestConfig.bar_threshold is a luma level in [0, 255), got {self.bar_threshold}")
        if not 0 <= self.max_text_area <= 1:
            raise ValueError(f"IngestConfig.max_text_area is a share of the frame in [0, 1], got {self.max_text_area}")
        if self.clip_model is not None and not os.path.isdir(self.clip_model):
            raise ValueError(f"IngestConfig.clip_model {self.clip_model!r} is not a directory: pass a local "
                             "CLIPModel directory (save_pretrained) or none")
        # the head file `sora.curation.clip_scores.save_aesthetic_head` writes (named here: no torch import)
        if self.clip_model is not None and not os.path.isfile(os.path.join(self.clip_model, "aesthetic_head.safetensors")):
            raise ValueError(f"IngestConfig.clip_model {self.clip_model!r} has no aesthetic_head.safetensors: add "
                             "one (sora.curation.clip_scores.save_aesthetic_head) or pass none")
        if self.min_aesthetic is not None and self.clip_model is None:
            raise ValueError("IngestConfig.min_aesthetic needs clip_model: pass the CLIP model directory "
                             "that scores aesthetics, or drop min_aesthetic")
        if self.dedup and not self.signatures:
            raise ValueError("IngestConfig.dedup needs signatures: turn signatures on or dedup off")
        if not 0 <= self.dedup_max_bits <= 64:
            raise ValueError(f"IngestConfig.dedup_max_bits counts bits of a 64-bit hash, got {self.dedup_max_bits}")
        if self.resolution is not None:
            from sora.buckets import RESOLUTIONS

            if self.resolution not in RESOLUTIONS:
                raise ValueError(f"IngestConfig.resolution {self.resolution!r} is not one of "
                                 f"{sorted(RESOLUTIONS)}; pass one of them or none")
