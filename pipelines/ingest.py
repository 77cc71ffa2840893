"""Ingest: raw video of any size and container -> native-aspect clips, bad input quarantined.

One streaming Ray Data pipeline over the sources; each source goes through every stage in one
process, one after another:

    list -> probe (deadline) -> split (shots, max length, drop short) -> filter -> bucket
         -> score (signature; text, aesthetic where configured) -> write

Every stage is a plain function of a source's state (a dict passed in-process: no frames and no
state cross a process boundary), so the same functions run in `run_sequential` (the benchmark's
baseline) and on Ray. On Ray the sources travel in blocks of a few (`source_blocks`: fewer
tasks, blocks shrinking toward the end so the workers finish together, and a number of blocks
that does not grow with the corpus) through ONE operator: plain tasks when no model is
configured (warm Ray workers, each with its own decode worker), else an actor pool
(`IngestStage`) whose actors load the models once. Only each source's small summary comes back
to the driver, which adds it to running totals (`SummaryTotals`) and never holds a list of them.

Outputs (DATA may be any fsspec URL):
- DATA/clips/<source-id>.parquet        one row per clip (contract: CLIPS_SCHEMA, docs/architecture.md)
- DATA/quarantine/<source-id>.parquet   one row per rejected input or clip: source, reason, stage
- DATA/_done/<source-id>.json           written last: the source is finished (its summary)
- DATA/_summary.json                    per-stage counts, throughput, bucket histogram

Exactly-once: a source's files have deterministic names and are moved into place whole, so a
Ray retry or a re-run rewrites the same rows; a re-run skips sources that have a _done marker.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.ingest_config import IngestConfig
from pipelines.clips import CLIPS_SCHEMA, QUARANTINE_SCHEMA, read_clips, read_quarantine, require_clips  # noqa: F401
from pipelines.ray_utils import node_id
from pipelines.stage import Stage, StageOutput
from pipelines.worker_cpu import claim_cpu
from sora.buckets import assign_bucket
from sora.curation.letterbox import content_box, scale_box
from sora.curation.shots import find_shots, frame_differences  # noqa: F401  (re-exported)
from sora.video_io import VideoError, decoder_pid, probe, read_frames


# Files a directory listing skips: sidecars and metadata that travel with videos. A file named
# explicitly on the command line is always ingested (and quarantined if it is not a video).
SIDECAR_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".md", ".srt", ".vtt", ".parquet", ".yaml", ".yml")


# --------------------------------------------------------------------------- listing
def list_sources(srcs: Iterable[str]) -> list[str]:
    """Expand files, directories (recursive), globs and fsspec URLs to a sorted list of URIs."""
    out: set[str] = set()
    for src in srcs:
        fs, path = storage.fs_and_path(src)
        proto = src.split("://", 1)[0] + "://" if "://" in src else ""
        if proto == "file://":
            proto = ""

        def uri(p: str) -> str:
            return f"{proto}{p}" if proto else p

        if any(ch in src for ch in "*?["):
            matches = fs.glob(path)
            for m in matches:
                if fs.isdir(m):
                    out.update(uri(p) for p in _walk(fs, m))
                else:
                    out.add(uri(m))
            if not matches:
                raise FileNotFoundError(f"no file matches {src!r}")
        elif fs.isdir(path):
            out.update(uri(p) for p in _walk(fs, path))
        elif fs.exists(path):
            out.add(uri(path))
        else:
            raise FileNotFoundError(f"no such file or directory: {src!r}")
    return sorted(out)


def _walk(fs, path: str) -> Iterator[str]:
    for p in fs.find(path):
        name = p.rsplit("/", 1)[-1]
        if name.startswith((".", "_")) or name.lower().endswith(SIDECAR_SUFFIXES):
            continue
        yield p


def source_id(source: str) -> str:
    return storage.stable_id("source", source)


def clip_id(source: str, start: int, num_frames: int) -> str:
    """Deterministic from source + span (docs/architecture.md): re-runs give the same ids."""
    return storage.stable_id(source, start, num_frames)


# --------------------------------------------------------------------------- source state
def new_state(source: str, path: str | None = None) -> dict:
    """A source's state as it goes through the stages; `path` is a local copy of a remote source."""
    return {"source": source, "path": path or source, "failed": False, "info": None, "clips": [],
            "quarantine": [], "seconds": {}}


def _reject(state: dict, stage: str, reason: str, clip: dict | None = None) -> None:
    state["quarantine"].append(
        {
            "source": state["source"],
            "reason": reason,
            "stage": stage,
            "clip_id": clip["clip_id"] if clip else None,
            "start_frame": clip["start_frame"] if clip else None,
            "num_frames": clip["num_frames"] if clip else None,
        }
    )


@contextmanager
def _local_copy(uri: str) -> Iterator[str]:
    """decord and PyAV need a real file: a remote source is fetched once, for all its stages."""
    if "://" not in uri or uri.startswith("file://"):
        yield uri.removeprefix("file://")
        return
    fs, path = storage.fs_and_path(uri)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="sora-ingest-")
    os.close(fd)
    try:
        fs.get(path, tmp)
        yield tmp
    finally:
        os.unlink(tmp)


def _timed(stage: str):
    """A stage function `fn(state, cfg, **models)` that records its seconds, skips a failed
    source, and turns an exception into the source's quarantine row (never a crash)."""

    def wrap(fn: Callable[..., None]):
        def run(state: dict, cfg: IngestConfig, **models) -> dict:
            t0 = time.perf_counter()
            if not state["failed"]:
                try:
                    fn(state, cfg, **models)
                except VideoError as e:
                    state["failed"] = True
                    _reject(state, stage, e.reason)
                except Exception as e:  # never let one file stop the run
                    state["failed"] = True
                    _reject(state, stage, f"{type(e).__name__}: {e}")
            state["seconds"][stage] = state["seconds"].get(stage, 0.0) + time.perf_counter() - t0
            return state

        run.__name__ = f"{stage}_stage"
        return run

    return wrap


# --------------------------------------------------------------------------- stages
@_timed("probe")
def probe_stage(state: dict, cfg: IngestConfig) -> None:
    info = probe(state["path"], timeout=cfg.probe_timeout)
    if info.num_frames < 1 or info.width < 1 or info.height < 1:
        raise VideoError(state["source"], f"no decodable frames ({info.width}x{info.height}, {info.num_frames} frames)")
    state["info"] = asdict(info)


def _even_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """(w, h) scaled so the short side is `short_side` (never up), both sides even."""
    scale = min(1.0, short_side / min(w, h))
    return max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)


def shot_content_boxes(path: str, shots: list[tuple[int, int]], info: dict,
                       cfg: IngestConfig) -> list[tuple[int, int, int, int]]:
    """Per shot, the content box (x0, y0, x1, y1) inside black bars, in displayed pixels, from
    `cfg.bar_frames` frames spread over the shot (one decode for all shots)."""
    w, h = info["width"], info["height"]
    if not cfg.crop_bars:
        return [(0, 0, w, h)] * len(shots)
    picks = [np.unique(np.linspace(s, e - 1, min(cfg.bar_frames, e - s)).round().astype(int)) for s, e in shots]
    size = (w, h) if min(w, h) <= cfg.bar_short_side else _even_size(w, h, cfg.bar_short_side)
    frames = read_frames(path, np.concatenate(picks).tolist(), size=size, timeout=cfg.decode_timeout)
    boxes, at = [], 0
    for p in picks:
        box = content_box(frames[at:at + len(p)], threshold=cfg.bar_threshold)
        boxes.append(scale_box(box, size, (w, h)))
        at += len(p)
    return boxes


def _transnet_shots(model, frames: np.ndarray, indices: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Shots in source frames from TransNetV2 on the analysed frames: the frames of a cut,
    dissolve or fade belong to no shot."""
    from sora.curation.shots import shots_between
    from sora.curation.transnetv2 import detect_transitions

    shots = shots_between(detect_transitions(model, frames), len(indices))
    return [(int(indices[a]), int(indices[b]) if b < len(indices) else n) for a, b in shots]


@_timed("split")
def split_stage(state: dict, cfg: IngestConfig, shot_model=None) -> None:
    """Shots (the frame-difference rule, or TransNetV2 when `shot_model` is given), black bars
    per shot, then clips of at most the maximum length with their motion score."""
    info = state["info"]
    n, w, h, fps = info["num_frames"], info["width"], info["height"], info["fps"]
    stride = max(1, int(np.ceil(n / cfg.max_analysis_frames)))
    indices = np.arange(0, n, stride)
    size = _even_size(w, h, cfg.analysis_short_side) if min(w, h) > cfg.analysis_short_side else \
        (max(2, w // 2 * 2), max(2, h // 2 * 2))
    frames = read_frames(state["path"], indices.tolist(), size=size, timeout=cfg.decode_timeout)
    # Cuts are found inside the bars common to the whole video (static bars dilute differences).
    ax0, ay0, ax1, ay1 = content_box(frames, threshold=cfg.bar_threshold) if cfg.crop_bars else (0, 0, *size)
    diffs = frame_differences(frames[:, ay0:ay1, ax0:ax1])
    if cfg.shots == "transnetv2":
        if shot_model is None:
            raise ValueError("shots='transnetv2' runs the split stage through pipelines.ingest_scores.ShotSplit")
        shots = _transnet_shots(shot_model, frames[:, ay0:ay1, ax0:ax1], indices, n)
    else:
        shots = find_shots(diffs, indices, n, cfg.scene_threshold)
    boxes = shot_content_boxes(state["path"], shots, info, cfg)
    max_len = max(1, min(cfg.max_clip_frames, int(cfg.max_clip_seconds * fps) if fps > 0 else cfg.max_clip_frames))
    for (shot_start, shot_end), (x0, y0, x1, y1) in zip(shots, boxes):
        # motion is measured inside the shot's content box (mapped to the analysis frames)
        bx0, by0, bx1, by1 = (int(round(x0 * size[0] / w)), int(round(y0 * size[1] / h)),
                              max(1, int(round(x1 * size[0] / w))), max(1, int(round(y1 * size[1] / h))))
        content = frame_differences(frames[:, by0:by1, bx0:bx1]) if (bx1 > bx0 and by1 > by0) else diffs
        for start in range(shot_start, shot_end, max_len):
            length = min(max_len, shot_end - start)
            clip = {"clip_id": clip_id(state["source"], start, length), "start_frame": start, "num_frames": length,
                    "crop_x": x0, "crop_y": y0, "crop_width": x1 - x0, "crop_height": y1 - y0,
                    "shot_detector": cfg.shots}
            if length < cfg.min_clip_frames:
                _reject(state, "split", f"too short: {length} frames < {cfg.min_clip_frames}", clip)
                continue
            # motion: mean analysed difference inside the clip, excluding the cut into it
            inside = (indices[1:] > start) & (indices[1:] < start + length) & (indices[:-1] >= start)
            clip["motion_score"] = float(content[inside].mean()) if inside.any() else 0.0
            state["clips"].append(clip)
    if not state["clips"] and not state["quarantine"]:
        _reject(state, "split", "no clips found")


@_timed("filter")
def filter_stage(state: dict, cfg: IngestConfig) -> None:
    kept = []
    for clip in state["clips"]:
        w, h = clip["crop_width"], clip["crop_height"]  # the content, inside any black bars
        if min(w, h) < cfg.min_side:
            _reject(state, "filter", f"too small: {w}x{h} (minimum side {cfg.min_side})", clip)
        elif max(w / h, h / w) > cfg.max_aspect:
            _reject(state, "filter", f"extreme aspect ratio {w}x{h} ({max(w / h, h / w):.2f}:1 > {cfg.max_aspect}:1)", clip)
        elif clip["num_frames"] < cfg.min_clip_frames:
            _reject(state, "filter", f"too few frames: {clip['num_frames']} < {cfg.min_clip_frames}", clip)
        elif clip["motion_score"] < cfg.min_motion:
            _reject(state, "filter", f"near-static: motion score {clip['motion_score']:.5f} < {cfg.min_motion}", clip)
        else:
            kept.append(clip)
    state["clips"] = kept


@_timed("bucket")
def bucket_stage(state: dict, cfg: IngestConfig) -> None:
    for clip in state["clips"]:  # the bucket follows the content's aspect, not the frame's
        b = assign_bucket(clip["crop_width"], clip["crop_height"], clip["num_frames"], resolution=cfg.resolution)
        clip.update(
            bucket=b.key, bucket_width=b.width, bucket_height=b.height, bucket_frames=b.num_frames, resolution=b.resolution
        )


@_timed("score")
def score_stage(state: dict, cfg: IngestConfig, scorers=None) -> None:
    """Per clip: near-duplicate signature, on-screen text area and aesthetic score (where
    configured; `scorers` holds the loaded models, see `pipelines.ingest_scores.ClipScores`);
    clips past a threshold are quarantined. A clip that fails to score is quarantined alone."""
    from pipelines.ingest_scores import score_clip, threshold_problem

    if not (cfg.signatures or scorers is not None):
        return
    kept = []
    for clip in state["clips"]:
        try:
            clip.update(score_clip(state["path"], clip, cfg, scorers))
        except VideoError as e:
            _reject(state, "score", e.reason, clip)
            continue
        except Exception as e:  # one clip's failure never drops its source
            _reject(state, "score", f"{type(e).__name__}: {e}", clip)
            continue
        problem = threshold_problem(clip, cfg)
        if problem:
            _reject(state, "score", problem, clip)
        else:
            kept.append(clip)
    state["clips"] = kept


def write_stage(state: dict, out: str) -> dict:
    """Write the source's clips and quarantine rows, then its _done marker. Returns the source's
    small summary (the only thing that travels back to the driver)."""
    t0 = time.perf_counter()
    sid = source_id(state["source"])
    info = state["info"] or {}
    clips = [
        {
            **{k: c[k] for k in ("clip_id", "start_frame", "num_frames", "motion_score")},
            "source": state["source"],
            "fps": info.get("fps"),
            "width": info.get("width"),
            "height": info.get("height"),
            "codec": info.get("codec"),
            "container": info.get("container"),
            "decoder": info.get("decoder"),
            "bit_rate": info.get("bit_rate"),
            **{k: c[k] for k in ("bucket", "bucket_width", "bucket_height", "bucket_frames", "resolution",
                                 "crop_x", "crop_y", "crop_width", "crop_height", "shot_detector")},
            **{k: c.get(k) for k in ("text_area", "aesthetic", "signature")},
        }
        for c in state["clips"]
    ]
    # A clip that failed in a later stage is quarantined, never also kept.
    bad = {q["clip_id"] for q in state["quarantine"] if q["clip_id"]}
    clips = [c for c in clips if c["clip_id"] not in bad] if not state["failed"] else []
    clips_url = storage.join(out, "clips", f"{sid}.parquet")
    quarantine_url = storage.join(out, "quarantine", f"{sid}.parquet")
    if clips:
        storage.write_parquet_atomic(pa.Table.from_pylist(clips, schema=CLIPS_SCHEMA), clips_url)
    if state["quarantine"]:
        storage.write_parquet_atomic(pa.Table.from_pylist(state["quarantine"], schema=QUARANTINE_SCHEMA), quarantine_url)
    state["seconds"]["write"] = time.perf_counter() - t0
    summary = {
        "source": state["source"],
        "clips": len(clips),
        "quarantined": len(state["quarantine"]),
        "source_failed": bool(state["failed"]),
        "stages": sorted({q["stage"] for q in state["quarantine"]}),
        "buckets": [c["bucket"] for c in clips],
        "seconds": state["seconds"],
        "models": state.get("models"),
        "node": node_id(),  # the Ray node that finished the source (None without Ray)
    }
    storage.write_json_atomic(summary, storage.join(out, "_done", f"{sid}.json"))
    return summary


def ingest_source(source: str, out: str, cfg: IngestConfig, shots=None, scores=None) -> dict:
    """Every stage for one source in this process; returns its summary. `shots` and `scores`
    are the loaded model stages (`pipelines.ingest_scores.ShotSplit`, `ClipScores`) where the
    config asks for models."""
    try:
        with _local_copy(source) as local:
            state = new_state(source, local)
            probe_stage(state, cfg)
            shots.apply_to(state) if shots is not None else split_stage(state, cfg)
            filter_stage(state, cfg)
            bucket_stage(state, cfg)
            scores.apply_to(state) if scores is not None else score_stage(state, cfg)
    except Exception as e:  # the remote copy failed (a vanished object, a refused read); stages never raise
        state = new_state(source)
        state["failed"] = True
        _reject(state, "probe", f"cannot read: {type(e).__name__}: {e}")
    return write_stage(state, out)


def load_models(cfg: IngestConfig) -> tuple:
    """(ShotSplit or None, ClipScores or None): the model stages the config asks for, loaded
    in this process (`pipelines.ingest_scores`)."""
    from pipelines.ingest_scores import ClipScores, ShotSplit, needs_models

    return (ShotSplit(cfg) if cfg.shots == "transnetv2" else None,
            ClipScores(cfg) if needs_models(cfg) else None)


# --------------------------------------------------------------------------- drivers
class SummaryTotals:
    """Running totals of source summaries for DATA/_summary.json: the driver adds each source's
    summary as it arrives and keeps only counts (flat in the number of sources)."""

    def __init__(self) -> None:
        self.sources = self.with_clips = self.rejected = self.clips = self.quarantine_rows = 0
        self.stage_seconds: dict[str, float] = {}
        self.quarantine_by_stage: dict[str, int] = {}
        self.buckets: dict[str, int] = {}

    def add(self, s: dict) -> None:
        self.sources += 1
        self.with_clips += bool(s["clips"])
        self.rejected += bool(s["source_failed"] or not s["clips"])
        self.clips += s["clips"]
        self.quarantine_rows += s["quarantined"]
        for k, v in s["seconds"].items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v
        for b in s["buckets"]:
            self.buckets[b] = self.buckets.get(b, 0) + 1
        for st in s["stages"]:
            self.quarantine_by_stage[st] = self.quarantine_by_stage.get(st, 0) + 1

    def result(self, listed: int, skipped: int, wall: float) -> dict:
        """Per-stage counts and throughput."""
        processed = self.sources - skipped
        return {
            "sources_listed": listed,
            "sources_skipped_already_done": skipped,
            "sources_processed": processed,
            "sources_with_clips": self.with_clips,
            "sources_rejected": self.rejected,
            "clips": self.clips,
            "quarantine_rows": self.quarantine_rows,
            "sources_with_quarantine_by_stage": self.quarantine_by_stage,
            "stage_cpu_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "stage_throughput_sources_per_cpu_second": {
                k: round(self.sources / v, 2) for k, v in self.stage_seconds.items() if v > 0
            },
            "wall_seconds": round(wall, 3),
            "sources_per_second": round(processed / wall, 3) if wall > 0 else None,
            "buckets": dict(sorted(self.buckets.items())),
        }


def _pending(sources: list[str], out: str, overwrite: bool, totals: SummaryTotals) -> tuple[list[str], int]:
    """Sources still to do, and how many a previous run finished (their summaries go to `totals`)."""
    if overwrite:
        return sources, 0
    done_names = storage.list_names(storage.join(out, "_done"))
    todo, done = [], 0
    for s in sources:
        name = f"{source_id(s)}.json"
        if name in done_names:
            totals.add(storage.read_json(storage.join(out, "_done", name)))
            done += 1
        else:
            todo.append(s)
    return todo, done


def remove_stale_temps(out: str, started: float) -> int:
    """Remove the temp files stopped writers left in what ingest writes (clips, _done, its own
    quarantine files, _summary.json) before `started`; see `storage.remove_stale_temps` for
    when that is safe. Returns how many went."""
    removed = [storage.remove_stale_temps(storage.join(out, "clips"), started),
               storage.remove_stale_temps(storage.join(out, "_done"), started),
               storage.remove_stale_temps(storage.join(out, "quarantine"), started, r"(dedup-)?[0-9a-f]{20}\.parquet"),
               storage.remove_stale_temps(out, started, r"_summary\.json")]
    return sum(len(r) for r in removed)


def run_sequential(srcs: Iterable[str], out: str, cfg: IngestConfig | None = None, overwrite: bool = False) -> dict:
    """The same stages in a plain loop in this process (the benchmark's baseline)."""
    cfg = cfg or IngestConfig()
    t0 = time.perf_counter()
    stale = remove_stale_temps(out, time.time())
    sources = list_sources(srcs)
    totals = SummaryTotals()
    todo, done = _pending(sources, out, overwrite, totals)
    shots, scores = load_models(cfg) if todo else (None, None)  # models load once for the whole loop
    for s in todo:
        totals.add(ingest_source(s, out, cfg, shots, scores))
    dedup = _dedup(out, cfg)
    summary = {**totals.result(len(sources), done, time.perf_counter() - t0), "stale_temps_removed": stale}
    return {**summary, "dedup": dedup} if dedup else summary


def _dedup(out: str, cfg: IngestConfig) -> dict | None:
    """The dataset-wide near-duplicate pass when cfg.dedup (pipelines.ingest_dedup)."""
    if not cfg.dedup:
        return None
    from pipelines.ingest_dedup import dedup_dataset

    return dedup_dataset(out, cfg.dedup_max_bits)


def source_blocks(n: int, workers: int, max_block: int = 16, max_blocks: int = 256) -> list[int]:
    """Sizes of the blocks `n` sources are cut into for `workers` parallel workers: each is
    ceil(remaining / (2 * workers)) sources, so blocks shrink toward the end and the workers run
    out of work together (guided self-scheduling, Polychronopoulos & Kuck 1987), while one task
    per block keeps Ray's per-task cost off most sources.

    Blocks hold at most `max_block` sources, or n / `max_blocks` on a corpus larger than
    max_block * max_blocks, and at least n / (8 * max_blocks): the driver keeps every input
    block (and its metadata) until the run ends, so their count must not grow with n. It is at
    most max_blocks + 8 * workers for any n (the shrinking tail is about 2 * workers * (1 + ln 16)
    blocks)."""
    largest = max(max_block, -(-n // max_blocks))
    smallest = max(1, -(-n // (8 * max_blocks)))
    sizes, left = [], n
    while left > 0:
        sizes.append(min(left, max(smallest, min(largest, -(-left // (2 * max(1, workers)))))))
        left -= sizes[-1]
    return sizes


def prepare_worker() -> None:
    """Set in a Ray task's or actor's process (the sequential loop keeps the defaults): one
    thread per decoder (the parallelism comes from one process per CPU; FFmpeg's thread per
    core would make parallel tasks' decoders contend), and freed memory kept for the next source
    (`sora.process_memory`: else a fresh worker faults each source's arrays in again)."""
    from sora.process_memory import keep_freed_memory
    from sora.video_io import set_decode_threads

    set_decode_threads(1)
    keep_freed_memory()


@contextmanager
def own_cpu(cfg: IngestConfig) -> Iterator[None]:
    """With `cfg.pin_cpu`, this thread and its decode worker on one free CPU of the machine while
    they work on a block (`pipelines.worker_cpu`), unpinned again after it."""

    def decoder() -> tuple[int, ...]:
        pid = decoder_pid()
        return () if pid is None else (pid,)

    claim = claim_cpu(decoder()) if cfg.pin_cpu else None
    try:
        yield
    finally:
        if claim is not None:
            claim.release(decoder())  # a decoder started (or restarted) since inherited the CPU


def ingest_block(batch: dict, out: str, cfg: dict) -> dict:
    """A Ray Data task (no model configured): every stage for each source of a block."""
    prepare_worker()
    cfg = IngestConfig(**cfg)
    with own_cpu(cfg):
        return {"summary": [json.dumps(ingest_source(str(s), out, cfg)) for s in batch["source"]]}


class IngestStage(Stage):
    """The actor pool's stage when a model is configured: each actor loads the model stages once
    (`load_models`) and runs every stage for each source of a block."""

    name = "ingest"
    config_cls = IngestConfig

    def setup(self) -> None:
        prepare_worker()
        self.shots, self.scores = load_models(self.cfg)

    def process(self, items: list[dict]) -> StageOutput:
        with own_cpu(self.cfg):
            return StageOutput([{"summary": json.dumps(ingest_source(str(i["source"]), self.out, self.cfg,
                                                                     self.shots, self.scores))} for i in items])


def build_ingest_dataset(sources: list[str], out: str, cfg: IngestConfig):
    """The streaming Ray Data pipeline: blocks of sources through one operator whose rows are
    the sources' summaries (JSON). Tasks or actors take 1 CPU each, `cfg.actors` of them at
    once (None: as many as the cluster has CPUs)."""
    import ray

    from pipelines.ingest_scores import needs_models
    from pipelines.stage import resolve_resources

    cfg = resolve_resources(cfg)  # a copy, with actors and GPUs from the cluster
    workers = max(1, min(cfg.actors, len(sources)))
    blocks, at = [], 0
    for size in source_blocks(len(sources), workers):
        blocks.append(pa.table({"source": pa.array(sources[at:at + size], pa.string())}))
        at += size
    # from_blocks takes each block's metadata on the driver (from_arrow runs a Ray task per
    # block for it, which waits for a worker process before the first source starts).
    ds = ray.data.from_blocks(blocks)
    # This dataset's own copy of the context, two of Ray Data's backpressure rules off: the
    # per-operator reservation admits one task until it has seen a task's output size, and
    # without it the downstream-capacity policy weighs the finished summaries against what the
    # driver's iterator holds alone and keeps the operator at one task at a time; either way
    # the other workers idle. Tasks at once are bounded below; a summary is a few hundred bytes.
    ds.context.op_resource_reservation_enabled = False
    ds.context.downstream_capacity_backpressure_ratio = None
    if cfg.shots == "transnetv2" or needs_models(cfg):  # the models load once per actor
        return ds.map_batches(IngestStage, fn_constructor_kwargs={"cfg": asdict(cfg), "out": out}, batch_size=None,
                              batch_format="numpy", num_cpus=1, num_gpus=cfg.num_gpus,
                              compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1))
    # Twice as many tasks submitted as run (each takes 1 CPU): Ray starts a worker's next block
    # the moment its last one ends, not when the driver's scheduling loop next looks.
    # Ray Data retries a task whose worker died; idempotent writes keep that exactly-once.
    return ds.map_batches(ingest_block, fn_kwargs={"out": out, "cfg": asdict(cfg)}, batch_size=None,
                          batch_format="numpy", num_cpus=1, compute=ray.data.TaskPoolStrategy(size=2 * workers))


def run_ingest(
    srcs: Iterable[str],
    out: str,
    cfg: IngestConfig | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[dict, int, int], None] | None = None,
) -> dict:
    """Ingest on Ray (local or the cluster at RAY_ADDRESS); writes DATA/_summary.json.

    `progress(summary_of_one_source, done, total)` is called as each source finishes."""
    cfg = cfg or IngestConfig()
    t0 = time.perf_counter()
    stale = remove_stale_temps(out, time.time())  # before any writer of this run starts
    sources = list_sources(srcs)
    totals = SummaryTotals()
    todo, done = _pending(sources, out, overwrite, totals)
    if todo:
        finished = 0
        for row in build_ingest_dataset(todo, out, cfg).iter_rows():
            s = json.loads(row["summary"])
            totals.add(s)
            finished += 1
            if progress:
                progress(s, finished, len(todo))
    dedup = _dedup(out, cfg)
    summary = totals.result(len(sources), done, time.perf_counter() - t0)
    summary["stale_temps_removed"] = stale
    if dedup:
        summary["dedup"] = dedup
    summary["config"] = asdict(cfg)
    storage.write_json_atomic(summary, storage.join(out, "_summary.json"))
    return summary
