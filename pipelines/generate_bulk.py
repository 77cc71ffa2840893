"""Bulk generation on Ray Data: a prompts file in, mp4s and a manifest out, resumable.

    PROMPTS (JSONL | CSV | Parquet, any fsspec URL)
      -> parse + validate each row (a bad row becomes an error row; the run goes on)
      -> drop ids the manifest already holds (resume)
      -> group requests of one shape (size, frames, steps, guidance, fps) into units of
         `batch_size`                                    [driver: cheap, deterministic]
      -> actor pool: one SoraPipeline per actor (loaded in __init__, GPUs where present);
         one packed batch per unit -> OUT/videos/<id>.mp4
                                   -> OUT/manifest/<unit-id>.parquet        [Ray Data]
         (two units per actor: one generates while the other's videos are encoded and written)

Prompt rows: `prompt` (required); optional `id`, `negative_prompt`, `size` ("WxH") or
`width` + `height`, `frames` / `num_frames` or `seconds`, `fps`, `seed`, `image` (a path/URL: the
first frame), `steps`, `guidance_scale`. Missing values come from `BulkConfig`, then from the
model's defaults. Each row becomes a `BulkRequest` (a `sora.request.GenerationRequest` with its
id and row number), checked against `sora.request.BULK_LIMITS`. Without an `id`, a row's id is
its row number plus a hash of its prompt, so a re-run over the same file finds the same ids.

The manifest (plain Parquet, `MANIFEST_SCHEMA`) has one row per input row: id, prompt,
parameters (also as JSON), seed, path, status ("ok" | "error"), error, seconds taken.

Exactly-once: a unit's manifest file is named by the hash of its ids and written whole (temp
file + rename, `pipelines.storage`), so a Ray retry rewrites the same file; a re-run first reads
the manifest and skips every id it holds (`retry_errors` re-queues the error rows; `read_manifest`
then prefers an id's "ok" row). Videos are moved in whole the same way (encoded to a local
file first) before their unit's manifest file, so a manifest row always points at a complete
video and OUT/videos never shows a partial one; a run killed mid-unit regenerates that unit.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Literal

import pyarrow as pa

from pipelines import storage
from pipelines.stage import Stage, StageOutput, StageResources, collect_stats, resolve_resources
from sora.conditioning import parse_size
from sora.request import BULK_LIMITS, GenerationRequest

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

# How a prompt row (and BulkConfig) names a request's fields in its error messages.
ROW_NAMES = {"num_frames": "frames"}


@dataclass(kw_only=True)
class BulkConfig(StageResources):
    """How a bulk run generates (with `StageResources`: actors, num_gpus, torch_threads). The
    generation values are defaults for rows without their own; None: the model's default."""

    size: str | None = None  # WIDTHxHEIGHT of rows without one (None: the model's)
    frames: int | None = None  # frame count of rows without frames or seconds (None: the model's)
    fps: float | None = None  # frame rate of rows without one (None: the model's)
    steps: int | None = None  # sampling steps of rows without them (None: the model's)
    guidance_scale: float | None = None  # guidance scale of rows without one (None: the model's)
    seed: int = 0  # base of the per-row seeds derived from ids (rows without a seed)
    sampler: Literal["euler", "heun", "ancestral"] | None = None  # sampler of every row (None: the model's)
    batch_size: int = 8  # requests of one shape per model call (one packed batch)
    # actor pool size, a model copy each; none: one per GPU of the cluster where it has GPUs, else one per CPU
    actors: int | None = None
    retry_errors: bool = False  # re-queue ids whose manifest row is an error
    limit: int | None = None  # only the first N rows of the prompts file (None: all)
    lora: str | None = None  # LoRA adapter directory for a Wan model (diffusers' layout), a path or URL
    lora_scale: float = 1.0  # strength of the LoRA adapter (1: as trained, 0: the base model)

    def __post_init__(self) -> None:
        super().__post_init__()
        width, height = parse_size(self.size) if self.size is not None else (None, None)
        GenerationRequest("-", width=width, height=height, num_frames=self.frames, fps=self.fps, steps=self.steps,
                          guidance_scale=self.guidance_scale, sampler=self.sampler,
                          seed=self.seed).validate(BULK_LIMITS, names=ROW_NAMES)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0 (or None: every row), got {self.limit}")
        if not math.isfinite(self.lora_scale):
            raise ValueError(f"lora_scale must be a finite number, got {self.lora_scale}")


@dataclass
class BulkRequest(GenerationRequest):
    """One valid prompt row: its request (every field the row or BulkConfig sets; None = the
    model's default), its id and its row number in the prompts file."""

    id: str = ""
    row: int = 0


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


def parse_request(row: int, record: dict, cfg: BulkConfig) -> BulkRequest:
    """A validated BulkRequest from one record; raises ValueError with a readable reason."""
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
        if width is None and height is None and cfg.size:
            width, height = parse_size(cfg.size)
    frames = _number(record, ("frames", "num_frames"), int, "frames")
    seconds = _number(record, ("seconds", "duration"), float, "seconds")
    if frames is None and seconds is None:
        frames = cfg.frames
    seed = _number(record, ("seed",), int, "seed")
    if seed is None:
        seed = int(storage.stable_id(cfg.seed, rid, n=8), 16) % (2**31)
    guidance = _number(record, ("guidance_scale", "guidance"), float, "guidance_scale")
    neg, image = record.get("negative_prompt"), record.get("image")
    request = BulkRequest(
        id=rid, row=row, prompt=prompt, seed=seed, width=width, height=height, num_frames=frames, seconds=seconds,
        fps=_number(record, ("fps",), float, "fps") or cfg.fps,
        steps=_number(record, ("steps", "num_inference_steps"), int, "steps") or cfg.steps,
        guidance_scale=cfg.guidance_scale if guidance is None else guidance, sampler=cfg.sampler,
        negative_prompt=None if _blank(neg) else str(neg), image=None if _blank(image) else str(image))
    return request.validate(BULK_LIMITS, names=ROW_NAMES)


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


def _row(req: BulkRequest | None, *, rid: str, row: int, unit: str, status: str, path: str | None = None,
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


class GenerateStage(Stage):
    """One SoraPipeline per actor, one unit (a same-shape batch of requests, as JSON) per
    call, written as one manifest file. Per-request failures become error rows, never a crash.
    An actor holds two units at once: one generates (the models: one unit at a time, the older
    first, ``models_turn``) while the other's videos are written."""

    name = "generate"
    config_cls = BulkConfig
    output = "manifest"
    schema = MANIFEST_SCHEMA
    id_column = "id"

    def __init__(self, model: str, out: str, cfg: BulkConfig | dict):
        self.model = model
        super().__init__(cfg, out)

    def setup(self) -> None:
        from sora.pipeline import SoraPipeline

        self.pipe = SoraPipeline.from_pretrained(self.model, device=self.device, lora=self.cfg.lora,
                                                 lora_scale=self.cfg.lora_scale)

    def batch_id(self, ids: list[str]) -> str:
        return storage.stable_id("unit", *sorted(ids))

    def process(self, items: list[dict[str, Any]]) -> StageOutput:
        rows = []
        for item in items:
            reqs = [BulkRequest.from_dict(r) for r in json.loads(str(item["unit"]))]
            rows += self.run_unit(reqs, self.batch_id([r.id for r in reqs]))
        ok = sum(r["status"] == "ok" for r in rows)
        return StageOutput(rows, counters={"ok": ok, "failed": len(rows) - ok})

    @classmethod
    def calls_per_actor(cls, cfg: Any) -> int:
        return 2  # one unit in the models while the other's videos are written

    def run_unit(self, reqs: list[BulkRequest], unit_id: str) -> list[dict]:
        """Generate a same-shape batch in the models' turn; on a batch failure, retry its
        requests one by one so that only the request at fault becomes an error row. Then, the
        turn given up, write its videos (a video that cannot be written is its request's error)."""
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
        made = []  # (request, frames, info, seconds)
        with self.models_turn.queued() as ticket:
            self.models_turn.wait(ticket)
            try:
                made += self._generate(good, images)
            except Exception:  # noqa: BLE001
                for r, im in zip(good, images):
                    try:
                        made += self._generate([r], [im])
                    except Exception as e:  # noqa: BLE001
                        rows.append(_row(r, rid=r.id, row=r.row, unit=unit_id, status="error",
                                         error=f"{type(e).__name__}: {e}"))
        for r, frames, info, seconds in made:  # the turn given up: beside the next unit's generation
            try:
                rows.append(self._write(r, frames, info, unit_id, seconds))
            except Exception as e:  # noqa: BLE001
                rows.append(_row(r, rid=r.id, row=r.row, unit=unit_id, status="error",
                                 error=f"writing its video: {type(e).__name__}: {e}"))
        return rows

    def _generate(self, reqs: list[BulkRequest], images: list) -> list[tuple[BulkRequest, Any, dict, float]]:
        t0 = time.perf_counter()
        out = self.pipe.generate([replace(r, image=im) for r, im in zip(reqs, images)])
        share = (time.perf_counter() - t0) / len(reqs)  # one packed batch: an equal share each
        return [(r, frames, info, share) for r, frames, info in zip(reqs, out.frames, out.info)]

    def _write(self, r: BulkRequest, frames, info: dict, unit_id: str, seconds: float) -> dict:
        from sora.video_io import write_video

        t0 = time.perf_counter()
        path = storage.join(self.out, "videos", f"{safe_name(r.id)}.mp4")
        with tempfile.TemporaryDirectory(prefix="sora-bulk-") as tmp:  # encoded locally, then moved in whole
            local = os.path.join(tmp, "video.mp4")
            write_video(local, frames, info["fps"])
            storage.put_file_atomic(local, path)
        resolved = {k: info[k] for k in ("width", "height", "num_frames", "fps", "steps", "guidance_scale")}
        return _row(r, rid=r.id, row=r.row, unit=unit_id, status="ok", path=path, resolved=resolved,
                    seconds=seconds + time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------


def plan(prompts: str, out: str, cfg: BulkConfig) -> tuple[list[BulkRequest], list[dict], dict]:
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


def make_units(reqs: list[BulkRequest], batch_size: int) -> list[list[BulkRequest]]:
    """Same-shape groups (`GenerationRequest.shape_key`) of at most ``batch_size`` requests, in
    a deterministic order."""
    groups: dict[str, list[BulkRequest]] = {}
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

    from sora.model_dir import ModelSource

    cfg = cfg or BulkConfig()
    t0 = time.perf_counter()
    out = out if "://" in out else os.path.abspath(out)  # actors may run elsewhere: absolute paths
    source = ModelSource(model, cfg.lora, cfg.lora_scale).absolute()
    source.check()  # fail early and clearly on a bad model directory or adapter (JSON only, no weights)
    model, cfg = source.model, replace(cfg, lora=source.lora)
    # temp files stopped writers left (before any writer of this run starts; storage.remove_stale_temps)
    started = time.time()
    stale = sum(len(storage.remove_stale_temps(storage.join(out, d), started)) for d in ("videos", "manifest")) + \
        len(storage.remove_stale_temps(out, started, r"_summary\.json"))
    todo, invalid, counts = plan(prompts, out, cfg)
    if invalid:
        unit = "invalid-" + storage.stable_id(*sorted(r["id"] for r in invalid))
        rows = [{**r, "unit": unit} for r in invalid]
        storage.write_parquet_atomic(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA),
                                     storage.join(out, "manifest", f"{unit}.parquet"))
    result = {**counts, "generated": 0, "errors": 0, "units": 0, "actors": [], "model_loads_per_actor": {},
              "units_per_node": {}, "stale_temps_removed": stale}
    units = make_units(todo, cfg.batch_size)
    if units:
        items = [{"unit": json.dumps([r.to_dict() for r in u])} for u in units]
        actors = resolve_resources(cfg).actors
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * actors))
        ds = GenerateStage.apply(ds, cfg, out=out, batch_size=1, model=model)
        stats = collect_stats(ds, len(todo), progress)
        result.update(generated=stats["ok"], errors=stats["failed"], units=stats["batches"], actors=stats["actors"],
                      model_loads_per_actor=stats["model_loads_per_actor"], units_per_node=stats["batches_per_node"])
    manifest = read_manifest(out)
    status = manifest["status"].to_pylist()
    result.update(manifest_rows=manifest.num_rows, manifest_ok=status.count("ok"),
                  manifest_errors=status.count("error"), seconds=round(time.perf_counter() - t0, 3),
                  config=asdict(cfg))
    storage.write_json_atomic(result, storage.join(out, "_summary.json"))
    return result
