"""The clips table (DATA/clips) and the quarantine table (DATA/quarantine): their contract
(`CLIPS_SCHEMA`, `QUARANTINE_SCHEMA`), readers, and a clip's content box (`content_crop`) for
every stage that decodes a clip's frames. `sora ingest` writes both (`pipelines.ingest`)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipelines import storage

CLIPS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("start_frame", pa.int64()),
        ("num_frames", pa.int64()),
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("bucket", pa.string()),
        ("bucket_width", pa.int64()),
        ("bucket_height", pa.int64()),
        ("bucket_frames", pa.int64()),
        ("resolution", pa.string()),
        ("motion_score", pa.float64()),
        ("codec", pa.string()),
        ("container", pa.string()),
        # Added columns (older datasets read them as null):
        ("decoder", pa.string()),  # which decoder read the source: "decord" or "pyav"
        ("crop_x", pa.int64()),  # the content box inside black bars, in displayed pixels;
        ("crop_y", pa.int64()),  # width/height above are the whole displayed picture and
        ("crop_width", pa.int64()),  # the bucket follows the content box
        ("crop_height", pa.int64()),
        ("shot_detector", pa.string()),  # "diff" or "transnetv2"
        ("text_area", pa.float64()),  # share of the frame under on-screen text (PP-OCR); null: not run
        ("aesthetic", pa.float64()),  # CLIP aesthetic score; null: no CLIP model given
        ("signature", pa.string()),  # near-duplicate signature (sora.curation.dedup); null: not run
        ("bit_rate", pa.int64()),  # the source file's bits per second (ranks near-duplicates)
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("reason", pa.string()),
        ("stage", pa.string()),
        ("clip_id", pa.string()),
        ("start_frame", pa.int64()),
        ("num_frames", pa.int64()),
    ]
)


def content_crop(clip: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """The clip's content box inside black bars as `read_frames`' crop (x0, y0, x1, y1), or None
    when it is the whole picture or unknown (a dataset ingested before content boxes)."""
    box = [clip.get(k) for k in ("crop_x", "crop_y", "crop_width", "crop_height")]
    if any(v is None or v != v for v in box):  # null (None, or NaN in a numpy batch)
        return None
    x, y, w, h = (int(v) for v in box)
    if (x, y, w, h) == (0, 0, int(clip["width"]), int(clip["height"])):
        return None
    return x, y, x + w, y + h


def content_size(clip: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of what a clip shows: its content box, else the whole displayed picture."""
    box = content_crop(clip)
    return (int(clip["width"]), int(clip["height"])) if box is None else (box[2] - box[0], box[3] - box[1])


def read_clips(data: str) -> pa.Table:
    """DATA/clips as one table (empty, with the contract's columns, if there are none)."""
    return storage.read_table(storage.join(data, "clips"), schema=CLIPS_SCHEMA)


def require_clips(data: str) -> pa.Table:
    """DATA/clips, or a FileNotFoundError that says what is missing and what to run first (a
    training stage given a wrong path must say so, not fail later inside its workers)."""
    clips = read_clips(data)
    if clips.num_rows == 0:
        fs, path = storage.fs_and_path(data)
        what = "no such dataset" if not fs.exists(path) else "the dataset has no clips"
        raise FileNotFoundError(f"{data}: {what}; make one with `sora ingest SOURCES --out {data}`")
    return clips


def read_quarantine(data: str) -> pa.Table:
    return storage.read_table(storage.join(data, "quarantine"), schema=QUARANTINE_SCHEMA)
