"""Caption: every clip gets a descriptive caption, from a captioner model or from sidecars.

    clips (DATA/clips) -> [skip clips already captioned] -> actor pool: decode frames, caption
                       -> DATA/captions/<batch-id>.parquet   (clip_id, caption, captioner)

`CaptionStage` is a `pipelines.stage.Stage`: the model is loaded once per actor, GPUs are
requested where the cluster has them, and per-clip failures (a clip that no longer decodes)
become quarantine rows, never a crash. Exactly-once: a batch's output file is named by the hash
of its clip ids and written whole, so a Ray retry rewrites the same file; a re-run first drops
the clips that already have a caption. With nothing to caption because ingest has not run (or no
sidecar exists), `run_caption` raises `MissingInputError` naming the command to run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage
from pipelines.clips import content_crop, content_size, require_clips
from pipelines.stage import MissingInputError, Stage, StageOutput, StageResources, collect_stats

# alignment: CLIP text-image cosine of the caption and the clip's frames (`CaptionConfig.clip_model`), else null
CAPTIONS_SCHEMA = pa.schema([("clip_id", pa.string()), ("caption", pa.string()), ("captioner", pa.string()),
                             ("alignment", pa.float32())])


def read_captions(data: str) -> pa.Table:
    return storage.read_table(storage.join(data, "captions"), schema=CAPTIONS_SCHEMA)


def is_sidecar(captioner: str) -> bool:
    return captioner.startswith("sidecar:")


def best_caption_table(data: str) -> pa.Table:
    """One caption per clip, as a table (clip_id, caption) sorted by clip_id: a model's
    recaption wins over a sidecar caption (the Sora / DALL-E 3 recipe trains on recaptions);
    among model captions the lexically last captioner name wins, so the choice never depends
    on file order (between two rows of one clip and captioner, the first read). Done in Arrow:
    a driver holds the captions as columns, not as a Python object per caption."""
    t = read_captions(data).select(["clip_id", "caption", "captioner"])
    if t.num_rows == 0:
        return t.select(["clip_id", "caption"])
    t = t.append_column("model", pc.invert(pc.starts_with(t["captioner"], "sidecar:")))
    order = pc.sort_indices(t, sort_keys=[("clip_id", "ascending"), ("model", "descending"),
                                          ("captioner", "descending")])  # a stable sort
    t = t.take(order)
    ids = t["clip_id"].combine_chunks()
    first = pa.concat_arrays([pa.array([True]), pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))])
    return t.filter(first).select(["clip_id", "caption"])


def best_captions(data: str) -> dict[str, str]:
    """`best_caption_table` as a dict clip_id -> caption."""
    t = best_caption_table(data)
    return dict(zip(t["clip_id"].to_pylist(), t["caption"].to_pylist()))


@dataclass(kw_only=True)
class CaptionConfig(StageResources):
    """How `sora caption` captions clips (with `StageResources`: actors, num_gpus, torch_threads)."""

    # actor pool size, a captioner copy each; none: one per GPU of the cluster where it has GPUs, else one per CPU
    actors: int | None = None
    model: str | None = None  # a local Hugging Face captioner directory (None: the captions.jsonl sidecars)
    batch_size: int = 8  # clips per model call
    num_frames: int = 4  # frames sampled per clip (image-only models see them as a grid)
    short_side: int = 128  # frames are decoded at this short side, aspect kept
    decode_timeout: float = 60.0  # seconds one clip's decode may take before it is quarantined
    recaption: bool = False  # with a model: also caption clips that only have a sidecar caption
    # a local CLIP model directory (CLIPModel + tokenizer): each new caption gets an alignment score; none: null
    clip_model: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "num_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.short_side < 2:
            raise ValueError(f"short_side must be at least 2 pixels, got {self.short_side}")
        if self.decode_timeout <= 0:
            raise ValueError(f"decode_timeout must be positive, got {self.decode_timeout}")
        if self.clip_model is not None and not os.path.isdir(self.clip_model):
            raise ValueError(f"clip_model {self.clip_model!r} is not a directory: pass a local CLIPModel directory "
                             "(save_pretrained, with its tokenizer) or none")


def sample_indices(start: int, num_frames: int, k: int) -> list[int]:
    """k frame indices spread evenly over [start, start + num_frames) (fewer if short)."""
    k = max(1, min(k, num_frames))
    return [start + int(round(i * (num_frames - 1) / max(1, k - 1))) for i in range(k)] if k > 1 else [start + num_frames // 2]


def decode_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    s = short_side / min(width, height)
    return max(2, round(width * s / 2) * 2), max(2, round(height * s / 2) * 2)


def clip_frames(clip: dict[str, Any], cfg: CaptionConfig):
    """The frames the caption stage shows a clip's captioner: ``cfg.num_frames`` spread over the
    clip, its content crop, decoded at ``cfg.short_side`` (aspect kept), within ``cfg.decode_timeout``.
    (k, H, W, 3) uint8."""
    from sora.video_io import read_frames

    idx = sample_indices(int(clip["start_frame"]), int(clip["num_frames"]), cfg.num_frames)
    size = decode_size(*content_size(clip), cfg.short_side)
    return read_frames(str(clip["source"]), idx, size=size, crop=content_crop(clip), timeout=cfg.decode_timeout)


class CaptionStage(Stage):
    """One captioner per actor; per batch: decode each clip's sampled frames, caption them in one
    call. An actor holds two batches at once: the next one decodes (and is already there when
    this one ends) while this one is in the models, one batch in the models at a time, the
    oldest first (``models_turn``)."""

    name = "caption"
    config_cls = CaptionConfig
    output = "captions"
    schema = CAPTIONS_SCHEMA

    def setup(self) -> None:
        from sora.captioner import Captioner
        from sora.curation.clip_scores import ClipScorer

        # no captioner: the items carry their (sidecar) captions and are decoded only to be scored
        self.captioner = Captioner.from_pretrained(self.cfg.model, device=self.device) if self.cfg.model else None
        self.clip = ClipScorer(self.cfg.clip_model, device=self.device) if self.cfg.clip_model else None

    def frames(self, clip: dict[str, Any]):
        return clip_frames(clip, self.cfg)

    @classmethod
    def calls_per_actor(cls, cfg: Any) -> int:
        return 2  # the next batch decodes while this one is in the models

    def process(self, items: list[dict[str, Any]]) -> StageOutput:
        from sora.curation.clip_scores import alignment_or_none

        with self.models_turn.queued() as ticket:
            decoded, errors = self.each(items, self.frames)  # beside an older batch in the models
            self.models_turn.wait(ticket)
            if self.captioner is not None:
                captions = self.captioner.caption([f for _, f in decoded]) if decoded else []
                names = [self.captioner.name] * len(captions)
            else:
                captions = [str(clip["caption"]) for clip, _ in decoded]
                names = [str(clip["captioner"]) for clip, _ in decoded]
            rows = [{"clip_id": str(clip["clip_id"]), "caption": text, "captioner": name,
                     "alignment": alignment_or_none(self.clip, frames, text)}
                    for (clip, frames), text, name in zip(decoded, captions, names)]
        return StageOutput(rows, errors)


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
    """Caption every clip of DATA that has no caption yet (with a model: a Ray Data actor pool;
    without: the sidecars). Returns counts. Raises FileNotFoundError when DATA has no clips and
    `MissingInputError` when sidecar captioning found no sidecar for any clip."""
    t0 = time.perf_counter()
    # temp files stopped writers left (before any writer of this run starts; storage.remove_stale_temps)
    started = time.time()
    stale = len(storage.remove_stale_temps(storage.join(data, "captions"), started)) + len(
        storage.remove_stale_temps(storage.join(data, "quarantine"), started, rf"{CaptionStage.name}-.*"))
    clips = require_clips(data)
    caps = read_captions(data)
    done = {c for c, who in zip(caps["clip_id"].to_pylist(), caps["captioner"].to_pylist())
            if not (cfg.recaption and cfg.model is not None and is_sidecar(who))}
    todo = clips.filter(pc.invert(pc.is_in(clips["clip_id"], pa.array(sorted(done), pa.string()))))
    already = len(done & set(clips["clip_id"].to_pylist()))
    result = {"clips": clips.num_rows, "already_captioned": already, "stale_temps_removed": stale,
              "captioned": 0, "failed": 0, "actors": [], "model_loads_per_actor": {}}
    if todo.num_rows == 0:
        return {**result, "seconds": round(time.perf_counter() - t0, 3)}
    if cfg.model is None:
        table, missing = sidecar_captions(todo)
        if table.num_rows == 0 and already == 0:
            raise MissingInputError(
                f"{data}: none of its {clips.num_rows} clips has a sidecar caption (a captions.jsonl next to its "
                f"source); caption them with a model: `sora caption --data {data} --model CAPTIONER_DIR` "
                f"(`sora train-captioner` makes one)")
        result.update(without_sidecar=len(missing))
        if cfg.clip_model is None:  # nothing to decode: the sidecars are the captions
            if table.num_rows:
                batch_id = storage.stable_id("sidecar", *sorted(table["clip_id"].to_pylist()))
                storage.write_parquet_atomic(table, storage.join(data, "captions", f"{batch_id}.parquet"))
            result.update(captioned=table.num_rows, failed=0)
            return {**result, "seconds": round(time.perf_counter() - t0, 3)}
        # the clips with a sidecar, their caption beside them, decoded by the stage only to be scored
        todo = todo.join(table.select(["clip_id", "caption", "captioner"]), "clip_id", join_type="inner")
        if todo.num_rows == 0:
            return {**result, "seconds": round(time.perf_counter() - t0, 3)}

    import ray

    from pipelines.ray_utils import table_blocks

    todo = todo.sort_by("clip_id")  # deterministic batches for a given to-do set
    # blocks made on the driver (`from_blocks`): `from_arrow` would start a task per block to
    # read its schema, a worker process whose CPU the actors wait for
    ds = CaptionStage.apply(ray.data.from_blocks(table_blocks(todo, cfg.batch_size)), cfg, out=data,
                            batch_size=cfg.batch_size)
    stats = collect_stats(ds, todo.num_rows, progress)
    result.update(captioned=stats["ok"], failed=stats["failed"], actors=stats["actors"],
                  model_loads_per_actor=stats["model_loads_per_actor"])
    return {**result, "seconds": round(time.perf_counter() - t0, 3)}
