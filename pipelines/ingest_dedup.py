"""Near-duplicates across a whole dataset: the same footage at another size, bitrate or
container is kept once.

Runs on the driver after ingest, over every clip in DATA/clips with a signature (this run's and
all earlier runs'), so new copies are matched against everything ingested before. Clips whose
signatures match (`sora.curation.dedup`) and whose durations agree within 10% form a group; the
group keeps its clip of the largest content area, then the highest source bitrate (then the
smallest clip id, so the choice is stable); the others leave DATA/clips and land in
DATA/quarantine as "duplicate of CLIP_ID". Re-running changes nothing: dropped clips are gone
from the clips table, and their quarantine rows live in one file per source
(DATA/quarantine/dedup-<source-id>.parquet), rewritten whole.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines import storage

_CHUNK = 512  # rows compared at once (memory: CHUNK x N x hashes x 8 bytes)


def _hashes(signatures: list[str]) -> np.ndarray:
    """(N, K) uint64 frame hashes from hex signatures of K frames each."""
    k = len(signatures[0]) // 16
    return np.array([[int(s[16 * j:16 * j + 16], 16) for j in range(k)] for s in signatures], dtype=np.uint64)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


def duplicate_groups(signatures: list[str], durations: np.ndarray, max_bits: float) -> list[list[int]]:
    """Groups (index lists, each of 2 or more) of clips that are the same footage."""
    n = len(signatures)
    if n < 2:
        return []
    hashes = _hashes(signatures)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for lo in range(0, n, _CHUNK):
        block = hashes[lo:lo + _CHUNK]  # (C, K)
        bits = _popcount(block[:, None, :] ^ hashes[None, :, :]).mean(-1)  # (C, N)
        longer = np.maximum(durations[lo:lo + _CHUNK, None], durations[None, :])
        close = np.abs(durations[lo:lo + _CHUNK, None] - durations[None, :]) <= 0.1 * longer
        for a, b in zip(*np.nonzero((bits <= max_bits) & close)):
            a = int(a) + lo
            if a < b:
                parent[root(int(b))] = root(a)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def dedup_dataset(data: str, max_bits: float) -> dict:
    """Drop near-duplicate clips of DATA (see the module docstring); returns counts."""
    from pipelines.clips import CLIPS_SCHEMA, QUARANTINE_SCHEMA, read_clips
    from pipelines.ingest import source_id

    table = read_clips(data)
    rows = [r for r in table.to_pylist() if r.get("signature")]
    durations = np.array([r["num_frames"] / r["fps"] if r["fps"] else 0.0 for r in rows])
    groups = duplicate_groups([r["signature"] for r in rows], durations, max_bits)
    dropped: dict[str, dict] = {}  # clip_id -> its quarantine row
    for group in groups:
        members = [rows[i] for i in group]
        best = max(members, key=lambda r: ((r["crop_width"] or r["width"]) * (r["crop_height"] or r["height"]),
                                           r.get("bit_rate") or 0, [-ord(c) for c in r["clip_id"]]))
        for r in members:
            if r is not best:
                dropped[r["clip_id"]] = {
                    "source": r["source"], "stage": "dedup", "clip_id": r["clip_id"],
                    "start_frame": r["start_frame"], "num_frames": r["num_frames"],
                    "reason": f"duplicate of {best['clip_id']} ({best['source']}, "
                              f"{best['crop_width']}x{best['crop_height']})"}
    by_source: dict[str, list[dict]] = {}
    for q in dropped.values():
        by_source.setdefault(q["source"], []).append(q)
    for source, quarantined in sorted(by_source.items()):
        sid = source_id(source)
        kept = [r for r in table.to_pylist() if r["source"] == source and r["clip_id"] not in dropped]
        clips_url = storage.join(data, "clips", f"{sid}.parquet")
        if kept:
            storage.write_parquet_atomic(pa.Table.from_pylist(kept, schema=CLIPS_SCHEMA), clips_url)
        else:
            fs, path = storage.fs_and_path(clips_url)
            fs.rm(path)
        q_url = storage.join(data, "quarantine", f"dedup-{sid}.parquet")
        earlier = storage.read_table(q_url, schema=QUARANTINE_SCHEMA).to_pylist() \
            if storage.fs_and_path(q_url)[0].exists(storage.fs_and_path(q_url)[1]) else []
        merged = {q["clip_id"]: q for q in earlier + quarantined}
        storage.write_parquet_atomic(
            pa.Table.from_pylist(sorted(merged.values(), key=lambda q: q["clip_id"]), schema=QUARANTINE_SCHEMA), q_url)
    return {"groups": len(groups), "duplicates_dropped": len(dropped)}
