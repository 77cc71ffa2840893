"""Bulk generation on Ray Data: a prompts file in, mp4s and a manifest out, resumable.

    PROMPTS (JSONL | CSV | Parquet, any fsspec URL)
      -> parse + validate each row (a bad row becomes an error row; the run goes on)
      -> drop ids the manifest already holds (resume)
      -> group requests of one shape (size, frames, steps, guidance, fps) into units of
         `batch_size`                                    [driver: cheap, deterministic]
      -> actor pool: one SoraPipeline per actor (loaded in __init__, GPUs where present);
         one packed batch per unit -> OUT/videos/<id>.mp4
                                   -> OUT/manifest/<unit-id>.parquet        [Ray Data]

Prompt rows: `prompt` (required); optional `id`, `negative_prompt`, `size` ("WxH") or
`width` + `height`, `frames` / `num_frames` or `seconds`, `fps`, `seed`, `image` (a path/URL: the
first frame), `steps`, `guidance_scale`. Missing values come from `BulkConfig`, then from the
model's defaults. Without an `id`, a row's id is its row number plus a hash of its prompt, so a
re-run over the same file finds the same ids.

The manifest (plain Parquet, `MANIFEST_SCHEMA`) has one row per input row: id, prompt,
parameters (also as JSON), seed, path, status ("ok" | "error"), error, seconds taken.

Exactly-once: a unit's manifest file is named by the hash of its ids and written whole (temp
file + rename, `pipelines.storage`), so a Ray retry rewrites the same file; a re-run first reads
the manifest and skips every id it holds (`retry_errors` re-queues the error rows; `read_manifest`
then prefers an id's "ok" row). Videos are written before their unit's manifest file, so a
manifest row always points at a complete video; a run killed mid-unit regenerates that unit.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from pipelines import storage
from sora.conditioning import parse_size

MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("row", pa.int64()),  # row number in the prompts file (0-based)
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("num_frames", pa.int32()),
    ("fps", pa.float64()),
    ("seed", pa.int64()),
    ("steps", pa.int32()),
    ("guidance_scale", pa.float64()),
    ("image", pa.string()),
    ("parameters", pa.string()),  # every generation parameter as JSON
    ("path", pa.string()),  # the mp4 (URL under OUT), null on error
    ("status", pa.string()),  # "ok" | "error"
    ("error", pa.string()),
    ("seconds", pa.float64()),  # wall time spent on this request (its share of the batch)
    ("unit", pa.string()),  # the manifest file (work unit) it was written in
])

MAX_SIDE = 4096
MAX_FRAMES = 1024


@dataclass
class BulkConfig:
    """How a bulk run generates. None = the model's default (its model_index.json)."""

    size: str | None = None  # default "WxH" for rows without one
    frames: int | None = None  # default frame count
    fps: float | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0  # base of the per-row seeds derived from ids (rows without a seed)
    sampler: str | None = None  # None: the model's default (sora.pipeline.DEFAULT_SAMPLER)
    batch_size: int = 8  # requests of one shape per model call (one packed batch)
    actors: int = 1  # actor pool size: one model copy each
    num_gpus: float | None = None  # per actor; None = 1 if the cluster has GPUs, else 0
    torch_threads: int | None = None  # intra-op threads per actor (None = torch's default)
    retry_errors: bool = False  # re-queue ids whose manifest row is an error
    limit: int | None = None  # only the first `limit` rows of the prompts file


@dataclass
class Request:
    """One valid prompt row, with every parameter resolved (None = the model's default)."""

    id: str
    row: int
    prompt: str
    seed: int
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    seconds: float | None = None
    fps: float | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    image: str | None = None

    def shape_key(self) -> tuple:
        return (self.width, self.height, self.num_frames, self.seconds, self.fps, self.steps, self.guidance_scale)


# ----------------------------------------------------------------------------------------
# Reading and validating prompt rows
# ----------------------------------------------------------------------------------------


def read_prompt_rows(url: str) -> list[tuple[dict | None, str | None]]:
    """Rows of a prompts file as (record, None), or (None, reason) for a row that does not
    parse (a malformed JSON line). JSONL (.jsonl/.ndjson/.json), CSV (.csv) or Parquet
    (.parquet or a directory of them), local or any fsspec URL."""
    fs, path = storage.fs_and_path(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"prompts file not found: {url}")
    name = path.rstrip("/").lower()
    if fs.isdir(path) or name.endswith(".parquet"):
        table = storage.read_table(url)
        return [(r, None) for r in table.to_pylist()]
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    if name.endswith(".csv"):
        return [({k: v for k, v in r.items() if k is not None}, None) for r in csv.DictReader(io.StringIO(text))]
    if name.endswith((".jsonl", ".ndjson", ".json")):
        rows: list[tuple[dict | None, str | None]] = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((None, f"line {n + 1} is not JSON: {e.msg}"))
                continue
            rows.append((obj, None) if isinstance(obj, dict) else (None, f"line {n + 1} is not a JSON object"))
        return rows
    raise ValueError(f"{url}: unknown prompts format; use .jsonl, .csv or .parquet")


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _number(record: dict, keys: tuple[str, ...], kind, name: str):
    for k in keys:
        v = record.get(k)
        if not _blank(v):
            try:
                x = kind(float(v)) if kind is int else kind(v)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {v!r}") from None
            if kind is int and float(v) != int(float(v)):
                raise ValueError(f"{name} must be a whole number, got {v!r}")
            return x
    return None


def default_id(row: int, prompt: str) -> str:
    return f"{row:06d}-{storage.stable_id(prompt, n=8)}"


def parse_request(row: int, record: dict, cfg: BulkConfig) -> Request:
    """A validated Request from one record; raises ValueError with a readable reason."""
    prompt = record.get("prompt")
    if _blank(prompt) or not isinstance(prompt, str):
        raise ValueError("missing or empty 'prompt'")
    rid = record.get("id")
    rid = default_id(row, prompt) if _blank(rid) else str(rid).strip()
    size = record.get("size")
    if not _blank(size):
        width, height = parse_size(size)
    else:
        width, height = _number(record, ("width",), int, "width"), _number(record, ("height",), int, "height")
        if (width is None) != (height is None):
            raise ValueError("give both width and height (or size)")
        if width is None and cfg.size:
            width, height = parse_size(cfg.size)
    if width is not None:
        if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
            raise ValueError(f"size {width}x{height} out of range (1..{MAX_SIDE} per side)")
        if width % 2 or height % 2:
            raise ValueError(f"mp4 (H.264 4:2:0) needs even sides, got {width}x{height}")
    frames = _number(record, ("frames", "num_frames"), int, "frames")
    seconds = _number(record, ("seconds", "duration"), float, "seconds")
    if frames is not None and seconds is not None:
        raise ValueError("give frames or seconds, not both")
    if frames is None and seconds is None:
        frames = cfg.frames
    if frames is not None and not (1 <= frames <= MAX_FRAMES):
        raise ValueError(f"frames must be in 1..{MAX_FRAMES}, got {frames}")
    if seconds is not None and not (0 < seconds <= 600):
        raise ValueError(f"seconds must be in (0, 600], got {seconds}")
    fps = _number(record, ("fps",), float, "fps") or cfg.fps
    if fps is not None and not (0 < fps <= 240):
        raise ValueError(f"fps must be in (0, 240], got {fps}")
    seed = _number(record, ("seed",), int, "seed")
    if seed is None:
        seed = int(storage.stable_id(cfg.seed, rid, n=8), 16) % (2**31)
    if not (0 <= seed < 2**63):
        raise ValueError(f"seed must be a non-negative 64-bit int, got {seed}")
    steps = _number(record, ("steps", "num_inference_steps"), int, "steps") or cfg.steps
    if steps is not None and not (1 <= steps <= 1000):
        raise ValueError(f"steps must be in 1..1000, got {steps}")
    guidance = _number(record, ("guidance_scale", "guidance"), float, "guidance_scale")
    guidance = cfg.guidance_scale if guidance is None else guidance
    neg, image = record.get("negative_prompt"), record.get("image")
    return Request(rid, row, prompt, seed, width, height, frames, seconds, fps, steps, guidance,
                   None if _blank(neg) else str(neg), None if _blank(image) else str(image))


def safe_name(rid: str) -> str:
    """A file name for an id: its safe characters, plus a hash when anything was changed."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", rid)[:80]
    return clean if clean == rid and not rid.startswith((".", "_")) else f"{clean.lstrip('._') or 'id'}-{storage.stable_id(rid, n=8)}"


def read_manifest(out: str) -> pa.Table:
    """The manifest of a bulk run, one row per id (an id's "ok" row wins over error rows that
    `retry_errors` re-ran). Empty when the run has not started."""
    table = storage.read_table(storage.join(out, "manifest"), schema=MANIFEST_SCHEMA)
    if table.num_rows == 0:
        return table
    rows = table.to_pylist()
    best: dict[str, dict] = {}
    for r in rows:
        if r["id"] not in best or (r["status"] == "ok" and best[r["id"]]["status"] != "ok"):
            best[r["id"]] = r
    return pa.Table.from_pylist(sorted(best.values(), key=lambda r: r["row"]), schema=MANIFEST_SCHEMA)


def _row(req: Request | None, *, rid: str, row: int, unit: str, status: str, path: str | None = None,
         error: str | None = None, seconds: float = 0.0, resolved: dict | None = None) -> dict:
    r = resolved or {}
    params = {} if req is None else {k: v for k, v in asdict(req).items() if k not in ("id", "row", "prompt")}
    params.update({k: v for k, v in r.items() if v is not None})
    return {
        "id": rid, "row": row, "prompt": None if req is None else req.prompt,
        "negative_prompt": None if req is None else req.negative_prompt,
        "width": r.get("width", req and req.width), "height": r.get("height", req and req.height),
        "num_frames": r.get("num_frames", req and req.num_frames), "fps": r.get("fps", req and req.fps),
        "seed": None if req is None else req.seed, "steps": r.get("steps", req and req.steps),
        "guidance_scale": r.get("guidance_scale", req and req.guidance_scale),
        "image": None if req is None else req.image, "parameters": json.dumps(params, sort_keys=True),
        "path": path, "status": status, "error": error, "seconds": float(seconds), "unit": unit,
    }


# ----------------------------------------------------------------------------------------
# The actor stage
# ----------------------------------------------------------------------------------------


class GenerateStage:
    """Ray Data callable class: one SoraPipeline per actor, one unit (a same-shape batch of
    requests, as JSON) per call. Per-request failures become error rows, never a crash."""

    loads_in_process = 0

    def __init__(self, model: str, out: str, cfg: dict):
        import torch

        from sora.pipeline import SoraPipeline

        self.cfg = BulkConfig(**cfg)
        self.out = out
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        device = "cuda" if (self.cfg.num_gpus or 0) > 0 and torch.cuda.is_available() else "cpu"
        self.pipe = SoraPipeline.from_pretrained(model, device=device)
        type(self).loads_in_process += 1
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        stats = {"ok": [], "errors": [], "rows": [], "pid": [], "model_loads": [], "seconds": []}
        for unit_json in batch["unit"]:
            t0 = time.perf_counter()
            reqs = [Request(**r) for r in json.loads(str(unit_json))]
            unit_id = storage.stable_id("unit", *sorted(r.id for r in reqs))
            rows = self.run_unit(reqs, unit_id)
            storage.write_parquet_atomic(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA),
                                         storage.join(self.out, "manifest", f"{unit_id}.parquet"))
            ok = sum(r["status"] == "ok" for r in rows)
            for k, v in (("ok", ok), ("errors", len(rows) - ok), ("rows", len(rows)), ("pid", self.pid),
                         ("model_loads", type(self).loads_in_process), ("seconds", time.perf_counter() - t0)):
                stats[k].append(v)
        return stats

    def run_unit(self, reqs: list[Request], unit_id: str) -> list[dict]:
        """Generate a same-shape batch; on a batch failure, retry its requests one by one so
        that only the request at fault becomes an error row."""
        from sora.pipeline import to_frames

        rows, good, images = [], [], []
        for r in reqs:  # inputs first: a missing image fails its own request only
            try:
                images.append(None if r.image is None else to_frames(r.image, "image")[:1])
                good.append(r)
            except Exception as e:  # noqa: BLE001 - any unreadable image is that row's error
                rows.append(_row(r, rid=r.id, row=r.row, unit=unit_id, status="error",
                                 error=f"image {r.image!r}: {type(e).__name__}: {e}"))
        if not good:
            return rows
        try:
            rows += self._generate(good, images, unit_id)
        except Exception:  # noqa: BLE001
            for r, im in zip(good, images):
                try:
                    rows += self._generate([r], [im], unit_id)
                except Exception as e:  # noqa: BLE001
                    rows.append(_row(r, rid=r.id, row=r.row, unit=unit_id, status="error",
                                     error=f"{type(e).__name__}: {e}"))
        return rows

    def _generate(self, reqs: list[Request], images: list, unit_id: str) -> list[dict]:
        import torch

        from sora.video_io import write_video

        t0 = time.perf_counter()
        r0 = reqs[0]
        out = self.pipe(
            [r.prompt for r in reqs],
            negative_prompt=[r.negative_prompt for r in reqs],
            width=r0.width, height=r0.height, num_frames=r0.num_frames, seconds=r0.seconds, fps=r0.fps,
            num_inference_steps=r0.steps, guidance_scale=r0.guidance_scale,
            generator=[torch.Generator().manual_seed(r.seed) for r in reqs],
            image=images if any(im is not None for im in images) else None,
            sampler=self.cfg.sampler,
        )
        rows = []
        for r, frames, info in zip(reqs, out.frames, out.info):
            path = storage.join(self.out, "videos", f"{safe_name(r.id)}.mp4")
            write_video(path, frames, info["fps"])
            resolved = {k: info[k] for k in ("width", "height", "num_frames", "fps", "steps", "guidance_scale")}
            rows.append(_row(r, rid=r.id, row=r.row, unit=unit_id, status="ok", path=path, resolved=resolved))
        share = (time.perf_counter() - t0) / len(reqs)  # one packed batch: an equal share each
        return [{**row, "seconds": share} for row in rows]


# ----------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------


def plan(prompts: str, out: str, cfg: BulkConfig) -> tuple[list[Request], list[dict], dict]:
    """Parse the prompts file against the manifest. Returns (requests to run, error rows to
    write for invalid rows not yet recorded, counts)."""
    records = read_prompt_rows(prompts)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    manifest = read_manifest(out)
    recorded = dict(zip(manifest["id"].to_pylist(), manifest["status"].to_pylist()))
    skip = {i for i, s in recorded.items() if s == "ok" or not cfg.retry_errors}
    todo, invalid, seen = [], [], set()
    for row, (record, problem) in enumerate(records):
        req, error = None, problem
        if error is None:
            try:
                req = parse_request(row, record, cfg)
            except ValueError as e:
                error = str(e)
        if req is not None and req.id in seen:
            error = f"duplicate id {req.id!r} (an earlier row has it)"
        if error is None:
            seen.add(req.id)
            if req.id not in skip:
                todo.append(req)
            continue
        # an error row keeps the row's own id where it has one, made unique by its row number
        record = record or {}
        prompt = record.get("prompt") if isinstance(record.get("prompt"), str) else None
        rid = req.id if req is not None else (
            str(record["id"]).strip() if not _blank(record.get("id")) else
            default_id(row, prompt) if prompt else f"{row:06d}-invalid")
        rid = f"{rid}@row{row}" if rid in seen else rid
        seen.add(rid)
        if rid not in skip:
            invalid.append({**_row(None, rid=rid, row=row, unit="", status="error", error=error), "prompt": prompt})
    counts = {"rows": len(records), "already_done": sum(1 for i in seen if i in skip),
              "invalid_new": len(invalid), "to_generate": len(todo)}
    return todo, invalid, counts


def make_units(reqs: list[Request], batch_size: int) -> list[list[Request]]:
    """Same-shape groups of at most ``batch_size`` requests, in a deterministic order."""
    groups: dict[str, list[Request]] = {}
    for r in sorted(reqs, key=lambda r: r.row):
        groups.setdefault(json.dumps(r.shape_key()), []).append(r)
    units = []
    for key in sorted(groups):
        g = groups[key]
        units += [g[i: i + batch_size] for i in range(0, len(g), batch_size)]
    return units


def run_generate_bulk(model: str, prompts: str, out: str, cfg: BulkConfig | None = None, *,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate every prompt of PROMPTS not yet in OUT's manifest. Returns a summary (also
    written to OUT/_summary.json)."""
    import ray

    from pipelines.ray_utils import has_gpus

    from sora.model_dir import read_index

    cfg = cfg or BulkConfig()
    t0 = time.perf_counter()
    out = out if "://" in out else os.path.abspath(out)  # actors may run elsewhere: absolute paths

    read_index(model)  # fail early and clearly on a bad model directory
    todo, invalid, counts = plan(prompts, out, cfg)
    if invalid:
        unit = "invalid-" + storage.stable_id(*sorted(r["id"] for r in invalid))
        rows = [{**r, "unit": unit} for r in invalid]
        storage.write_parquet_atomic(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA),
                                     storage.join(out, "manifest", f"{unit}.parquet"))
    result = {**counts, "generated": 0, "errors": 0, "units": 0, "actors": [], "model_loads_per_actor": {}}
    units = make_units(todo, cfg.batch_size)
    if units:
        if cfg.num_gpus is None:
            cfg.num_gpus = 1.0 if has_gpus() else 0.0
        items = [{"unit": json.dumps([asdict(r) for r in u])} for u in units]
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * max(1, cfg.actors))).map_batches(
            GenerateStage,
            fn_constructor_kwargs={"model": os.path.abspath(model) if "://" not in model else model, "out": out,
                                   "cfg": asdict(cfg)},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            num_gpus=cfg.num_gpus,
        )
        loads: dict[int, int] = {}
        for row in ds.iter_rows():
            result["generated"] += int(row["ok"])
            result["errors"] += int(row["errors"])
            result["units"] += 1
            loads[int(row["pid"])] = max(loads.get(int(row["pid"]), 0), int(row["model_loads"]))
            if progress:
                progress(result["units"], len(units))
        result["actors"] = sorted(loads)
        result["model_loads_per_actor"] = {str(k): v for k, v in loads.items()}
    manifest = read_manifest(out)
    status = manifest["status"].to_pylist()
    result.update(manifest_rows=manifest.num_rows, manifest_ok=status.count("ok"),
                  manifest_errors=status.count("error"), seconds=round(time.perf_counter() - t0, 3),
                  config=asdict(cfg))
    storage.write_json_atomic(result, storage.join(out, "_summary.json"))
    return result
