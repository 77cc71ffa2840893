"""Caption: every clip gets a descriptive caption, from a captioner model or from sidecars.

    clips (DATA/clips) -> [skip clips already captioned] -> actor pool: decode frames, caption
                       -> DATA/captions/<batch-id>.parquet   (clip_id, caption, captioner)

The model is loaded once per actor (Ray's batch-inference pattern: a callable class loads in
`__init__`, maps one batch in `__call__`); GPUs are requested where the cluster has them.
Per-clip failures (a clip that no longer decodes) become quarantine rows, never a crash.

Exactly-once: a batch's output file is named by the hash of its clip ids and written whole, so
a Ray retry rewrites the same file; a re-run first drops the clips that already have a caption.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage
from pipelines.ingest import QUARANTINE_SCHEMA, read_clips

CAPTIONS_SCHEMA = pa.schema([("clip_id", pa.string()), ("caption", pa.string()), ("captioner", pa.string())])


def read_captions(data: str) -> pa.Table:
    return storage.read_table(storage.join(data, "captions"), schema=CAPTIONS_SCHEMA)


def is_sidecar(captioner: str) -> bool:
    return captioner.startswith("sidecar:")


def best_captions(data: str) -> dict[str, str]:
    """One caption per clip: a model's recaption wins over a sidecar caption (the Sora /
    DALL-E 3 recipe trains on recaptions); among model captions the lexically last captioner
    name wins, so the choice never depends on file order."""
    t = read_captions(data)
    best: dict[str, tuple[tuple[int, str], str]] = {}
    for cid, text, who in zip(t["clip_id"].to_pylist(), t["caption"].to_pylist(), t["captioner"].to_pylist()):
        rank = (0 if is_sidecar(who) else 1, who)
        if cid not in best or rank > best[cid][0]:
            best[cid] = (rank, text)
    return {cid: text for cid, (_, text) in best.items()}


@dataclass
class CaptionConfig:
    model: str | None = None  # a local Hugging Face model dir; None = use sidecar captions
    batch_size: int = 8  # clips per model call
    num_frames: int = 4  # frames sampled per clip (a grid for image-only models)
    short_side: int = 128  # frames are decoded at this short side (aspect kept)
    actors: int = 1  # actor pool size (one model copy each)
    num_gpus: float | None = None  # per actor; None = 1 if the cluster has GPUs, else 0
    decode_timeout: float = 60.0
    recaption: bool = False  # with a model: also caption clips that only have a sidecar caption


def sample_indices(start: int, num_frames: int, k: int) -> list[int]:
    """k frame indices spread evenly over [start, start + num_frames) (fewer if short)."""
    k = max(1, min(k, num_frames))
    return [start + int(round(i * (num_frames - 1) / max(1, k - 1))) for i in range(k)] if k > 1 else [start + num_frames // 2]


def decode_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    s = short_side / min(width, height)
    return max(2, round(width * s / 2) * 2), max(2, round(height * s / 2) * 2)


class CaptionStage:
    """Ray Data callable class: one captioner per actor, one batch of clips per call."""

    loads_in_process = 0  # how many times a model was loaded in this worker process

    def __init__(self, cfg: dict, out: str):
        from sora.captioner import Captioner

        self.cfg = CaptionConfig(**cfg)
        self.out = out
        device = "cuda" if (self.cfg.num_gpus or 0) > 0 else "cpu"
        self.captioner = Captioner.from_pretrained(self.cfg.model, device=device)
        type(self).loads_in_process += 1
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from sora.video_io import VideoError, read_frames

        t0 = time.perf_counter()
        ids, frames, errors = [], [], []
        for i, cid in enumerate(batch["clip_id"]):
            try:
                idx = sample_indices(int(batch["start_frame"][i]), int(batch["num_frames"][i]), self.cfg.num_frames)
                size = decode_size(int(batch["width"][i]), int(batch["height"][i]), self.cfg.short_side)
                frames.append(read_frames(str(batch["source"][i]), idx, size=size, timeout=self.cfg.decode_timeout))
                ids.append(str(cid))
            except VideoError as e:
                errors.append((i, e.reason))
            except Exception as e:  # one bad clip never stops the batch
                errors.append((i, f"{type(e).__name__}: {e}"))
        captions = self.captioner.caption(frames) if frames else []
        if ids:
            batch_id = storage.stable_id(*sorted(ids))
            table = pa.Table.from_pylist(
                [{"clip_id": c, "caption": t, "captioner": self.captioner.name} for c, t in zip(ids, captions)],
                schema=CAPTIONS_SCHEMA,
            )
            storage.write_parquet_atomic(table, storage.join(self.out, "captions", f"{batch_id}.parquet"))
        if errors:
            rows = [{"source": str(batch["source"][i]), "reason": r, "stage": "caption", "clip_id": str(batch["clip_id"][i]),
                     "start_frame": int(batch["start_frame"][i]), "num_frames": int(batch["num_frames"][i])} for i, r in errors]
            err_id = storage.stable_id("caption-errors", *sorted(r["clip_id"] for r in rows))
            storage.write_parquet_atomic(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA),
                                         storage.join(self.out, "quarantine", f"caption-{err_id}.parquet"))
        return {
            "captioned": [len(ids)],
            "failed": [len(errors)],
            "pid": [self.pid],
            "model_loads": [type(self).loads_in_process],
            "seconds": [time.perf_counter() - t0],
        }


def sidecar_captions(clips: pa.Table, field: str = "caption") -> tuple[pa.Table, list[str]]:
    """Captions already known: a `captions.jsonl` next to each source, one JSON object per
    line with `file` (name relative to that directory) and `field`. Returns the captions of
    the clips it covers, and the clip ids it does not."""
    cache: dict[str, dict[str, str]] = {}
    rows, missing = [], []
    for cid, source in zip(clips["clip_id"].to_pylist(), clips["source"].to_pylist()):
        parent, name = source.rsplit("/", 1)
        if parent not in cache:
            cache[parent] = {}
            url = storage.join(parent, "captions.jsonl")
            if storage.exists(url):
                fs, path = storage.fs_and_path(url)
                with fs.open(path, "r", encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            obj = json.loads(line)
                            if obj.get("file") and obj.get(field):
                                cache[parent][obj["file"]] = obj[field]
        text = cache[parent].get(name)
        if text:
            rows.append({"clip_id": cid, "caption": text, "captioner": f"sidecar:captions.jsonl#{field}"})
        else:
            missing.append(cid)
    return pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA), missing


def run_caption(data: str, cfg: CaptionConfig, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """Caption every clip of DATA that has no caption yet. Returns counts."""
    t0 = time.perf_counter()
    clips = read_clips(data)
    caps = read_captions(data)
    done = {c for c, who in zip(caps["clip_id"].to_pylist(), caps["captioner"].to_pylist())
            if not (cfg.recaption and cfg.model is not None and is_sidecar(who))}
    todo = clips.filter(pc.invert(pc.is_in(clips["clip_id"], pa.array(sorted(done), pa.string()))))
    result = {"clips": clips.num_rows, "already_captioned": len(done & set(clips["clip_id"].to_pylist())),
              "captioned": 0, "failed": 0, "actors": [], "model_loads_per_actor": {}}
    if todo.num_rows == 0:
        return {**result, "seconds": round(time.perf_counter() - t0, 3)}
    if cfg.model is None:
        table, missing = sidecar_captions(todo)
        if table.num_rows:
            batch_id = storage.stable_id("sidecar", *sorted(table["clip_id"].to_pylist()))
            storage.write_parquet_atomic(table, storage.join(data, "captions", f"{batch_id}.parquet"))
        result.update(captioned=table.num_rows, failed=0, without_sidecar=len(missing))
        return {**result, "seconds": round(time.perf_counter() - t0, 3)}

    import ray

    from pipelines.ray_utils import has_gpus, table_blocks

    if cfg.num_gpus is None:
        cfg.num_gpus = 1.0 if has_gpus() else 0.0
    todo = todo.sort_by("clip_id")  # deterministic batches for a given to-do set
    ds = ray.data.from_arrow(table_blocks(todo, cfg.batch_size)).map_batches(
        CaptionStage,
        fn_constructor_kwargs={"cfg": cfg.__dict__, "out": data},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_gpus=cfg.num_gpus,
    )
    loads: dict[int, set[int]] = {}
    for row in ds.iter_rows():
        result["captioned"] += int(row["captioned"])
        result["failed"] += int(row["failed"])
        loads.setdefault(int(row["pid"]), set()).add(int(row["model_loads"]))
        if progress:
            progress(result["captioned"] + result["failed"], todo.num_rows)
    result["actors"] = sorted(loads)
    result["model_loads_per_actor"] = {str(pid): max(v) for pid, v in loads.items()}
    return {**result, "seconds": round(time.perf_counter() - t0, 3)}
