"""Atomic writes and the temp files a stopped writer leaves, on a local disk and on S3 (moto on loopback)."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from pipelines import storage


class Stopped(BaseException):
    """The writer's process stops between its temp file and the rename (a kill, a lost node)."""


def stopped_write(monkeypatch, url: str, data: bytes) -> None:
    """`storage.write_bytes_atomic` stopped before its rename: the real temp file stays behind."""
    fs, _ = storage.fs_and_path(url)

    def mv(self, *args, **kwargs):
        raise Stopped

    with monkeypatch.context() as m:
        m.setattr(type(fs), "mv", mv)
        with pytest.raises(Stopped):
            storage.write_bytes_atomic(url, data)


def hidden(url: str) -> list[str]:
    fs, path = storage.fs_and_path(url)
    fs.invalidate_cache(path)
    return sorted(n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) if n.startswith("."))


@pytest.fixture
def s3_root(loopback_s3):
    """The URL of a folder in an empty bucket on moto's S3 server on 127.0.0.1."""
    return f"{loopback_s3}/ds"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_stopped_writers_temp_file_goes_at_the_next_start_and_nothing_else(where, tmp_path, monkeypatch, request):
    root = str(tmp_path / "ds") if where == "local" else request.getfixturevalue("s3_root")
    clips, quarantine = storage.join(root, "clips"), storage.join(root, "quarantine")
    table = pa.table({"x": [1, 2, 3]})
    storage.write_parquet_atomic(table, storage.join(clips, "done.parquet"))
    stopped_write(monkeypatch, storage.join(clips, "cut.parquet"), b"PAR1 half of a file")
    stopped_write(monkeypatch, storage.join(quarantine, "encode-1.parquet"), b"half")
    stopped_write(monkeypatch, storage.join(quarantine, "caption-1.parquet"), b"half")  # another stage's
    (left,) = hidden(clips)
    assert storage.TEMP_NAME.fullmatch(left)["name"] == "cut.parquet"
    assert storage.list_names(clips) == {"done.parquet"}  # readers never see the temp file
    assert storage.read_table(clips).equals(table)
    gap = 1.1 if where == "s3" else 0.05  # S3 keeps LastModified to the second
    time.sleep(gap)
    started = time.time()
    time.sleep(gap)
    stopped_write(monkeypatch, storage.join(clips, "live.parquet"), b"a writer still going")  # after the start

    ours = [n for n in hidden(quarantine) if n.startswith(".encode-")]
    assert storage.remove_stale_temps(clips, started) == [left]
    assert storage.remove_stale_temps(quarantine, started, r"encode-.*") == ours
    assert [storage.TEMP_NAME.fullmatch(n)["name"] for n in hidden(clips)] == ["live.parquet"]
    assert [storage.TEMP_NAME.fullmatch(n)["name"] for n in hidden(quarantine)] == ["caption-1.parquet"]
    assert storage.list_names(clips) == {"done.parquet"} and storage.read_table(clips).equals(table)
    assert storage.remove_stale_temps(storage.join(root, "missing"), started) == []


def test_put_file_atomic_moves_a_local_file_in_whole(tmp_path, monkeypatch):
    local = tmp_path / "video.mp4"
    local.write_bytes(b"\x00" * 1000)
    out = str(tmp_path / "out" / "videos")
    storage.put_file_atomic(str(local), storage.join(out, "a.mp4"))
    fs, path = storage.fs_and_path(out)

    def mv(self, *args, **kwargs):
        raise Stopped

    monkeypatch.setattr(type(fs), "mv", mv)
    with pytest.raises(Stopped):
        storage.put_file_atomic(str(local), storage.join(out, "b.mp4"))
    assert storage.list_names(out) == {"a.mp4"}
    assert (tmp_path / "out" / "videos" / "a.mp4").read_bytes() == local.read_bytes()


def test_reads_see_files_another_process_wrote_after_this_one_listed(s3_root):
    """A stage's driver lists its output directory (stale temps, resume) before the workers
    write there; afterwards the same process must read what they wrote, not its cached listing."""
    import fsspec
    import pyarrow.parquet as pq

    schema = pa.schema([("x", pa.int64())])

    def parquet(values) -> bytes:
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"x": values}, schema=schema), buf)
        return buf.getvalue().to_pybytes()

    url = f"{s3_root}/latents"
    storage.write_bytes_atomic(f"{s3_root}/quarantine/a.json", b"{}")
    storage.write_bytes_atomic(f"{url}/part-0.parquet", parquet([1]))
    assert storage.list_names(s3_root) == {"latents", "quarantine"}  # caches the parent's listing
    assert storage.list_names(url) == {"part-0.parquet"}
    assert storage.remove_stale_temps(url, time.time()) == []
    assert storage.read_table(url, schema).column("x").to_pylist() == [1]
    # a worker elsewhere: its own filesystem instance, not this process's cache
    fs, path = storage.fs_and_path(url)
    other = fsspec.filesystem("s3", skip_instance_cache=True, **fs.storage_options)
    other.pipe(f"{path}/part-1.parquet", parquet([2, 3]))
    other.pipe(f"{fs_root(s3_root)}/manifest/m.parquet", parquet([4]))
    assert storage.list_names(url) == {"part-0.parquet", "part-1.parquet"}
    assert storage.read_table(url, schema).column("x").to_pylist() == [1, 2, 3]
    assert storage.exists(f"{s3_root}/manifest")
    assert storage.read_table(f"{s3_root}/manifest", schema).column("x").to_pylist() == [4]


def fs_root(url: str) -> str:
    return storage.fs_and_path(url)[1]
