"""Storage helpers over fsspec: every path here may be local, `s3://`, `gs://`, `memory://`.

The tables of the data contract (docs/architecture.md) are directories of Parquet files readable with
plain pyarrow. Stages write one file per unit of work under a deterministic name and move it
into place only when complete, so a retried or re-run unit overwrites its own file with the
same rows: the results are exactly-once even though Ray runs work at least once.
Files whose names start with "." or "_" are invisible to pyarrow's dataset reader; that is
where temporary files and markers go. A writer stopped between its temp file and the rename (a
killed process, a lost node) leaves the temp file behind: each stage's run removes those of the
directories it writes when it starts (`remove_stale_temps`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URL and the path inside it (local paths are made absolute)."""
    if "://" not in url:
        url = os.path.abspath(url)
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def stable_id(*parts: Any, n: int = 20) -> str:
    """A deterministic hex id of the given parts (sha1), e.g. a clip's or a source's id."""
    h = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8"))
    return h.hexdigest()[:n]


def _listed(url: str):
    """`fs_and_path(url)` with the filesystem's cached listings of the path dropped first.
    Object-store filesystems (s3fs, gcsfs) cache every listing in their shared instance, and
    stages' workers (other processes, other nodes) write where this process listed before:
    a read that trusted the cache would miss their files."""
    fs, path = fs_and_path(url)
    fs.invalidate_cache(path)
    return fs, path


def exists(url: str) -> bool:
    fs, path = _listed(url)
    return fs.exists(path)


# The hidden name a file NAME is written under before its rename: ".NAME.tmp-" + 8 hex digits.
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-[0-9a-f]{8}")


def _temp_for(path: str) -> str:
    parent, name = path.rsplit("/", 1)
    return f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` to `url` so readers never see a partial file: a hidden temp file in the
    same directory (`TEMP_NAME`), then a rename (a copy + delete on object stores, still
    all-or-nothing for readers that list the directory, because the temp name is hidden)."""
    fs, path = fs_and_path(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = _temp_for(path)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def put_file_atomic(local: str, url: str) -> None:
    """Copy the local file `local` to `url` the way `write_bytes_atomic` writes: a hidden temp
    file beside it, then a rename (for files written by a library that wants a real path)."""
    fs, path = fs_and_path(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = _temp_for(path)
    fs.put_file(local, tmp)
    fs.mv(tmp, path)


def _modified(info: dict) -> float | None:
    """A listing entry's last-modified time in seconds since the epoch (local: mtime; S3:
    LastModified; GCS: updated; memory: created), or None where the filesystem gives none."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str) and v:
            try:
                v = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(v, dt.datetime):
            return (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)).timestamp()
    return None


def remove_stale_temps(url: str, started: float, names: str = ".*") -> list[str]:
    """Remove the temp files (`TEMP_NAME`) that stopped writers left directly under the
    directory `url`: those of files whose name fully matches the regex `names` and that were
    last modified before `started` (seconds since the epoch). Returns the names removed.

    The rule that keeps every live writer's temp file: a stage's run calls this when it starts,
    before any writer of its own starts, with `started` taken before the call. A temp file lives
    from its writer's open to its rename, so one already there then is a stopped writer's (a
    killed process, a lost node), unless another run writes into the same directory at that
    moment: `names` keeps to the files this stage writes (stages share DATA/quarantine under
    their own name prefixes), and a file modified since `started` is kept. Two runs of one stage
    into one directory at once are not supported: a temp file that the other run's writer is
    about to rename may go, and that writer fails (Ray retries its task). On an object store the
    comparison uses the store's clock."""
    fs, path = _listed(url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    pattern = re.compile(names)
    removed = []
    for info in entries:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        m = TEMP_NAME.fullmatch(name)
        if info.get("type") != "file" or m is None or not pattern.fullmatch(m["name"]):
            continue
        modified = _modified(info)
        if modified is not None and modified >= started:
            continue
        try:
            fs.rm_file(info["name"])
        except FileNotFoundError:  # its writer renamed it, or another cleanup got there first
            continue
        removed.append(name)
    return removed


def write_parquet_atomic(table: pa.Table, url: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(url, buf.getvalue())


def write_json_atomic(obj: Any, url: str) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def read_json(url: str) -> Any:
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def list_names(url: str) -> set[str]:
    """Names of the visible files directly under a directory URL (empty if it is missing):
    hidden names (temp files of writers still going, or stopped) are left out."""
    fs, path = _listed(url)
    if not fs.exists(path):
        return set()
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return {n for n in names if not n.startswith(".")}


# Files read into one chunk by `read_table` before the next group starts (or fewer, past the bytes).
GROUP_FILES, GROUP_BYTES = 64, 64 << 20


def read_table(url: str, schema: pa.Schema | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read a table directory (or one file) with plain pyarrow. A missing directory reads as
    an empty table of `schema` when one is given.

    Stages write a file per source or per batch, so a directory holds many small files. Every
    group of files (`GROUP_FILES`, at most about `GROUP_BYTES`) is joined into one chunk as it
    is read: a table of one chunk per file would keep Arrow's per-array bookkeeping (and the
    native heap it fragments) for every file, memory that grows with the corpus, not its rows."""
    fs, path = _listed(url)
    if not fs.exists(path):
        if schema is None:
            raise FileNotFoundError(url)
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    files = [path] if fs.isfile(path) else sorted(
        p for p in fs.find(path) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_"))
    )
    if not files:
        if schema is None:
            return pa.table({})
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    groups: list[pa.Table] = []
    group: list[pa.Table] = []
    size = 0
    for i, p in enumerate(files):
        with fs.open(p, "rb") as f:
            group.append(pq.read_table(f, columns=columns, schema=schema))
        size += group[-1].nbytes
        if len(group) >= GROUP_FILES or size >= GROUP_BYTES or i == len(files) - 1:
            joined = pa.concat_tables(group, promote_options="default")
            # one file of its own stays as written (its row groups: no 2 GiB binary offsets overflow)
            groups.append(joined.combine_chunks() if len(group) > 1 else joined)
            group, size = [], 0
    return pa.concat_tables(groups, promote_options="default")
