"""Durable video jobs: one JSON record per job plus its outputs, in a storage dir or fsspec URL.

The HTTP ingress and the generator replicas of `pipelines.serve` share nothing but this store,
so a restarted ingress or replica finds every job where it left it:

    STORE/journal/<id>.json               records just accepted, written together as one file
                                          (a group commit: one write for every POST of a burst)
                                          until each is stored under jobs/ + active/
    STORE/jobs/<id>.json                  the record (the OpenAI video object + the job's
                                          `sora.request.GenerationRequest` as JSON)
    STORE/active/<id>                     marker: accepted and not finished (what a restarted
                                          ingress resumes, without reading every record)
    STORE/deleted/<id>                    tombstone: a replica still running a deleted job must
                                          not write it back
    STORE/inputs/<id>/reference.png       the decoded, re-encoded input_reference image
    STORE/videos/<id>/video.mp4 | thumbnail.webp | spritesheet.jpg

A record is always written whole (temp file + rename, `pipelines.storage`), so a reader never
sees half a record. The ingress answers a POST once the job is in a journal file; a restarted
ingress first moves every journal file's records to jobs/ + active/ (`replay_journal`), so an
answered job is never lost, and a record already there is never overwritten. There is no
cross-process lock: the ingress writes a record when it accepts, re-queues or fails a job, a
generator replica while it owns the job (claim, heartbeats, result). Outputs are deterministic
(the seed is chosen once, at creation, and stored), so when a job runs twice - a replica presumed
dead that was only slow - both runs write the same bytes.

Ids are `video_` + 12 hex digits of the creation time in ms + 20 random hex digits, so sorting
ids sorts by creation time (cursor pagination needs no index) and an id is never a path: every
path below is built from an id that matched `ID_RE`.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

import orjson

from pipelines import storage
from sora.request import GenerationRequest

STATUSES = ("queued", "in_progress", "completed", "failed")
FINAL = frozenset({"completed", "failed"})
ID_RE = re.compile(r"video_[0-9a-f]{32}")

# The keys of OpenAI's `Video` object (openai.types.Video); everything else in a record is ours.
PUBLIC_KEYS = ("id", "object", "model", "status", "progress", "created_at", "completed_at", "expires_at",
               "error", "size", "seconds", "prompt", "remixed_from_video_id")
# Our additions to the public object (extra keys are allowed by the openai client's models).
EXTRA_PUBLIC_KEYS = ("output_size",)

# variant -> (file name, media type) of GET /v1/videos/{id}/content?variant=...
VARIANTS = {
    "video": ("video.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
    "spritesheet": ("spritesheet.jpg", "image/jpeg"),
}


def new_id(now: float | None = None) -> str:
    """A fresh job id: time-ordered (ms) and unguessable (80 random bits)."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"video_{ms:012x}{secrets.token_hex(10)}"


def is_id(text: object) -> bool:
    return isinstance(text, str) and ID_RE.fullmatch(text) is not None


def check_id(text: str) -> str:
    # FOOTGUN: this assert is the last line of defence against path traversal; callers
    # validate ids from requests first and answer 404, this only catches our own bugs.
    assert is_id(text), f"not a video id: {text!r}"
    return text


def public_view(record: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI video object of a record (what GET /v1/videos/{id} returns)."""
    out = {k: record.get(k) for k in PUBLIC_KEYS}
    out["object"] = "video"
    out["progress"] = int(record.get("progress") or 0)
    for k in EXTRA_PUBLIC_KEYS:
        if record.get(k) is not None:
            out[k] = record[k]
    return out


def new_record(video_id: str, *, model: str, prompt: str, size: str, seconds: str, output_size: str,
               job: dict[str, Any], remixed_from: str | None = None, now: float | None = None) -> dict[str, Any]:
    """A queued job. ``job`` is what the replica runs: a `GenerationRequest.to_dict()` whose
    image/video are URLs in the store (read back with `JobStore.request_of`)."""
    now = time.time() if now is None else now
    return {
        "id": check_id(video_id), "object": "video", "model": model, "status": "queued", "progress": 0,
        "created_at": int(now), "completed_at": None, "expires_at": None, "error": None,
        "size": size, "seconds": seconds, "prompt": prompt, "remixed_from_video_id": remixed_from,
        "output_size": output_size,
        # ours, not public
        "job": job, "attempts": 0, "history": [], "heartbeat_at": None, "worker": None,
        "started_at": None, "updated_at": now,
    }


def json_bytes(obj: Any) -> bytes:
    """Compact JSON of a record or an API body (str, int, float, bool, None, lists, str-keyed dicts)
    as UTF-8, by orjson: several times faster than `json.dumps`, which a burst of POSTs pays per
    job on the event loop. What orjson refuses (a string with a lone surrogate, an int beyond 64
    bits) is written by `json.dumps` with escapes instead, so any value a request parsed is stored."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def heartbeat_age(record: dict[str, Any], now: float | None = None) -> float:
    """Seconds since the owning replica last wrote this in-progress record (inf if never)."""
    beat = record.get("heartbeat_at")
    return float("inf") if beat is None else (time.time() if now is None else now) - float(beat)


class JobStore:
    """Job records and outputs under one storage root (local dir or fsspec URL)."""

    def __init__(self, root: str):
        if "://" not in root:
            import os

            root = os.path.abspath(root)
        self.root = root.rstrip("/")

    # -- paths (every one built from a checked id) ---------------------------------------

    def record_url(self, video_id: str) -> str:
        return storage.join(self.root, "jobs", f"{check_id(video_id)}.json")

    def output_url(self, video_id: str, variant: str) -> str:
        assert variant in VARIANTS, f"unknown variant {variant!r}"
        return storage.join(self.root, "videos", check_id(video_id), VARIANTS[variant][0])

    def input_url(self, video_id: str) -> str:
        return storage.join(self.root, "inputs", check_id(video_id), "reference.png")

    def _marker(self, kind: str, video_id: str) -> str:
        return storage.join(self.root, kind, check_id(video_id))

    # -- records -------------------------------------------------------------------------

    def create(self, record: dict[str, Any]) -> None:
        """Store a new record and mark it active (the marker first: a crash in between leaves
        an active marker without a record, which `resume` simply drops)."""
        storage.write_bytes_atomic(self._marker("active", record["id"]), b"")
        self.put(record)

    def put(self, record: dict[str, Any]) -> None:
        record["updated_at"] = time.time()
        storage.write_json_atomic(record, self.record_url(record["id"]))

    def get(self, video_id: str) -> dict[str, Any] | None:
        """The record, or None when the id is unknown, deleted, or its record unreadable."""
        if not is_id(video_id) or self.is_deleted(video_id):
            return None
        try:
            rec = storage.read_json(self.record_url(video_id))
        except FileNotFoundError:
            rec = self._journaled(video_id)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return rec if isinstance(rec, dict) and rec.get("id") == video_id else None

    def _journaled(self, video_id: str) -> dict[str, Any] | None:
        """The record of a job accepted just now, still only in the journal."""
        for url in self.journal_files():
            try:
                for rec in self.read_journal(url):
                    if rec["id"] == video_id:
                        return rec
            except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, TypeError):
                continue
        try:  # its journal file was replayed meanwhile: the record is stored by now
            return storage.read_json(self.record_url(video_id))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def is_deleted(self, video_id: str) -> bool:
        return storage.exists(self._marker("deleted", video_id))

    def delete(self, video_id: str) -> bool:
        """Tombstone the job, then remove its record, outputs and input. False if unknown."""
        if self.get(video_id) is None:
            return False
        storage.write_bytes_atomic(self._marker("deleted", video_id), b"")
        self.remove_files(video_id)
        return True

    def remove_files(self, video_id: str) -> None:
        for url in (self.record_url(video_id), self._marker("active", video_id)):
            fs, path = storage.fs_and_path(url)
            if fs.exists(path):
                fs.rm(path)
        for sub in ("videos", "inputs"):
            fs, path = storage.fs_and_path(storage.join(self.root, sub, check_id(video_id)))
            if fs.exists(path):
                fs.rm(path, recursive=True)

    def request_of(self, record: dict[str, Any]) -> GenerationRequest:
        """The generation request of a record. Records of earlier versions held a plan with the
        input image's URL as "input" and a remix's source id as "source": read those too."""
        job = dict(record["job"])
        if "input" in job or "source" in job:
            source = job.pop("source", None)
            job.update(prompt=record["prompt"], image=job.pop("input", None),
                       video=None if source is None else self.output_url(source, "video"))
        return GenerationRequest.from_dict(job)

    def adopt(self, record: dict[str, Any]) -> bool:
        """Store a journaled record under jobs/ + active/ unless it is there already (a replica may
        have moved it on since) or the job was deleted. True when written."""
        vid = record["id"]
        if self.is_deleted(vid) or storage.exists(self.record_url(vid)):
            return False
        self.create(dict(record))
        return True

    # -- the journal: accepted jobs, one file per group commit ---------------------------

    def journal(self, records: list[dict[str, Any]]) -> str:
        """Write new records as one journal file (named after the first id) -> its URL."""
        url = storage.join(self.root, "journal", f"{check_id(records[0]['id'])}.json")
        storage.write_bytes_atomic(url, json_bytes(records))
        return url

    def journal_files(self) -> list[str]:
        names = storage.list_names(storage.join(self.root, "journal"))
        return [storage.join(self.root, "journal", n) for n in sorted(names)
                if n.endswith(".json") and is_id(n[:-5])]

    def read_journal(self, url: str) -> list[dict[str, Any]]:
        return [r for r in storage.read_json(url) if isinstance(r, dict) and is_id(r.get("id"))]

    def drop_journal(self, url: str) -> None:
        fs, path = storage.fs_and_path(url)
        if fs.exists(path):
            fs.rm(path)

    def replay_journal(self) -> list[str]:
        """Move every journaled record to jobs/ + active/ (see `adopt`), then drop the journal
        files -> the ids written. What a (re)started ingress does before resuming."""
        written = []
        for url in self.journal_files():
            try:
                records = self.read_journal(url)
            except FileNotFoundError:  # replayed meanwhile
                continue
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
                continue  # never written by us (ours are whole): left for a person to look at
            written += [r["id"] for r in records if self.adopt(r)]
            self.drop_journal(url)
        return written

    # -- active set (what a restarted ingress resumes) -----------------------------------

    def active_ids(self) -> list[str]:
        return sorted(n for n in storage.list_names(storage.join(self.root, "active")) if is_id(n))

    def clear_active(self, video_id: str) -> None:
        fs, path = storage.fs_and_path(self._marker("active", video_id))
        if fs.exists(path):
            fs.rm(path)

    # -- listing -------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """All job ids, oldest first (ids sort by creation time)."""
        names = storage.list_names(storage.join(self.root, "jobs"))
        return sorted(n[:-5] for n in names if n.endswith(".json") and is_id(n[:-5]))

    def page(self, after: str | None, limit: int, order: str) -> tuple[list[dict[str, Any]], bool]:
        """One page of records for cursor pagination: the ``limit`` jobs that come after the
        id ``after`` in ``order`` ("asc" oldest first, "desc" newest first), and whether more
        follow. ``after`` need not exist any more (ids compare by time)."""
        assert order in ("asc", "desc") and limit >= 1, (order, limit)
        ids = self.ids()
        if order == "desc":
            ids.reverse()
        if after is not None:
            ids = [i for i in ids if (i > after if order == "asc" else i < after)]
        out: list[dict[str, Any]] = []
        for i, vid in enumerate(ids):
            rec = self.get(vid)  # None when deleted meanwhile
            if rec is not None:
                out.append(rec)
            if len(out) == limit:
                # deleted jobs leave jobs/ at once, so a listed id is (almost always) a record
                return out, i + 1 < len(ids)
        return out, False

    # -- outputs -------------------------------------------------------------------------

    def write_output(self, video_id: str, variant: str, data: bytes) -> None:
        storage.write_bytes_atomic(self.output_url(video_id, variant), data)

    def write_input(self, video_id: str, png: bytes) -> None:
        storage.write_bytes_atomic(self.input_url(video_id), png)

    def read_bytes(self, url: str) -> bytes:
        fs, path = storage.fs_and_path(url)
        with fs.open(path, "rb") as f:
            return f.read()

    def check(self) -> None:
        """Raise if the store cannot be listed (the ingress's health check)."""
        fs, path = storage.fs_and_path(self.root)
        fs.makedirs(path, exist_ok=True)
        fs.ls(path)
