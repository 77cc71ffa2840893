"""Storage helpers over fsspec: every path here may be local, `s3://`, `gs://`, `memory://`.

The tables of the data contract (docs/architecture.md) are directories of Parquet files readable with
plain pyarrow. Stages write one file per unit of work under a deterministic name and move it
into place only when complete, so a retried or re-run unit overwrites its own file with the
same rows: the results are exactly-once even though Ray runs work at least once.
Files whose names start with "." or "_" are invisible to pyarrow's dataset reader; that is
where temporary files and markers go.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` to `url` so readers never see a partial file: a hidden temp file in the
    same directory, then a rename (a copy + delete on object stores, still all-or-nothing
    for readers that list the directory, because the temp name is hidden)."""
    fs, path = fs_and_path(url)
    parent, name = path.rsplit("/", 1)
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


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
    """Names of the visible files directly under a directory URL (empty if it is missing)."""
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        return set()
    return {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}


def read_table(url: str, schema: pa.Schema | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read a table directory (or one file) with plain pyarrow. A missing directory reads as
    an empty table of `schema` when one is given."""
    fs, path = fs_and_path(url)
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
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f, columns=columns, schema=schema))
    return pa.concat_tables(tables, promote_options="default")
