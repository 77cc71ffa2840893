"""Ingest on real Ray with real files: every input accounted for, exactly-once, s3:// too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from footage import fault_hook_dir, fault_worker
from media import write_bad_files, write_good_clips
from pipelines import storage
from pipelines.ingest import IngestConfig, list_sources, read_clips, read_quarantine, run_ingest, run_sequential
from sora import video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clip_rows(data: str) -> list[tuple]:
    t = read_clips(data)
    return sorted(zip(t["clip_id"].to_pylist(), t["source"].to_pylist(), t["start_frame"].to_pylist(),
                      t["num_frames"].to_pylist(), t["bucket"].to_pylist()))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mixed"))
    good = write_good_clips(root)
    bad = write_bad_files(os.path.join(root, "bad"), next(p for p in good if p.endswith(".mp4")))
    # a file whose decoder "hangs" where a test injects faults (tests/footage.py)
    shutil.copy(next(p for p in good if p.endswith(".mp4")), os.path.join(root, "bad", "hangs.mp4"))
    with open(os.path.join(root, "captions.jsonl"), "w") as f:  # a sidecar: skipped by listing
        f.write("{}\n")
    return root, good, bad


def cli_env(**extra) -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    env.update(extra)
    return env


def faulty_env(tmp_path) -> dict:
    """The CLI's environment with decode-worker faults injected into every process it starts
    (files named *hangs* make the decoder hang): no test hook in the production config."""
    hooks = fault_hook_dir(str(tmp_path / "hooks"))
    return cli_env(PYTHONPATH=os.pathsep.join([hooks, REPO]))


_STALL_HOOK = '''
"""Test-only: the decode faults of tests/footage.py, and a writer that stops for good just
before it renames the temp file of {name!r} into place (where the test kills the run)."""
import runpy
import time

runpy.run_path({faults!r})

import fsspec.implementations.local as _local

_mv = _local.LocalFileSystem.mv


def _stalled_mv(self, path1, path2, *args, **kwargs):
    if str(path2).endswith("/" + {name!r}):
        time.sleep(3600)
    return _mv(self, path1, path2, *args, **kwargs)


_local.LocalFileSystem.mv = _stalled_mv
'''


def stalled_writer_env(tmp_path, name: str) -> dict:
    """`faulty_env`, and every process's storage writer stops before renaming a file `name`
    into place (its real temp file written), as a process killed mid-write leaves it."""
    faults = os.path.join(fault_hook_dir(str(tmp_path / "hooks")), "sitecustomize.py")
    stall = tmp_path / "stall-hooks"
    stall.mkdir()
    (stall / "sitecustomize.py").write_text(_STALL_HOOK.format(faults=faults, name=name))
    return cli_env(PYTHONPATH=os.pathsep.join([str(stall), REPO]))


def hidden_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root)
                  for n in names if n.startswith("."))


def run_cli(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def test_cli_mixed_directory_every_input_once_hang_killed(mixed, tmp_path):
    root, good, bad = mixed
    data = str(tmp_path / "data")
    t0 = time.monotonic()
    proc = run_cli(["ingest", root, "--out", data, "--probe-timeout", "3"], faulty_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 200
    clips = read_clips(data)
    quarantine = read_quarantine(data)
    clip_sources = set(clips["source"].to_pylist())
    q = dict(zip(quarantine["source"].to_pylist(), quarantine["reason"].to_pylist()))
    stages = dict(zip(quarantine["source"].to_pylist(), quarantine["stage"].to_pylist()))
    inputs = set(good) | set(bad) | {os.path.join(root, "bad", "hangs.mp4")}
    # every input exactly once: good files in clips only, bad files in quarantine only
    assert clip_sources == set(good), sorted(set(good) ^ clip_sources)
    assert set(q) == inputs - set(good)
    assert not clip_sources & set(q)
    assert quarantine.num_rows == len(q), "a bad source was quarantined more than once"
    for path, reason in q.items():
        assert reason and len(reason) > 8, (path, reason)
        assert stages[path] in ("probe", "split"), (path, stages[path])
    assert "timed out" in q[os.path.join(root, "bad", "hangs.mp4")]
    assert "empty" in q[os.path.join(root, "bad", "zero.mp4")].lower() or "0 bytes" in q[os.path.join(root, "bad", "zero.mp4")]
    # native aspect kept in the buckets (9:16 stays portrait, 2.39:1 stays 2.39:1)
    buckets = dict(zip(clips["source"].to_pylist(), zip(clips["bucket_width"].to_pylist(), clips["bucket_height"].to_pylist())))
    for path, (w, h) in good.items():
        bw, bh = buckets[path]
        assert abs((bw / bh) / (w / h) - 1) < 0.1, (path, w, h, bw, bh)
    b916 = buckets[os.path.join(root, "clip_9x16.webm")]
    assert b916[1] > b916[0]
    b239 = buckets[os.path.join(root, "clip_239x100.webm")]
    assert abs(b239[0] / b239[1] - 2.4) < 0.1
    # the summary is written, with per-stage counts and throughput
    import json

    summary = json.load(open(os.path.join(data, "_summary.json")))
    assert summary["sources_listed"] == len(inputs) and summary["clips"] == clips.num_rows
    assert set(summary["stage_cpu_seconds"]) >= {"probe", "split", "filter", "bucket", "write"}
    # plain pyarrow reads the tables
    assert pq.read_table(os.path.join(data, "clips")).num_rows == clips.num_rows


def test_rerun_is_idempotent_and_matches_sequential(mixed, tmp_path, ray_session):
    root, good, bad = mixed
    data = str(tmp_path / "data")
    first = run_ingest([root], data)
    rows = clip_rows(data)
    assert len(rows) == first["clips"] > 0
    again = run_ingest([root], data)  # finished sources are skipped, nothing duplicated
    assert again["sources_skipped_already_done"] == again["sources_listed"]
    assert clip_rows(data) == rows
    run_ingest([root], data, overwrite=True)  # redone from scratch: the same rows, no more
    assert clip_rows(data) == rows
    seq = str(tmp_path / "seq")
    run_sequential([root], seq)
    assert clip_rows(seq) == rows


def test_ray_ingest_pins_decoders_keeps_freed_memory_and_its_scheduling_settings_to_itself(mixed, tmp_path,
                                                                                           ray_session):
    """A Ray task decodes with one thread per decoder (the parallelism comes from the tasks) and
    keeps the memory a source's arrays freed for the next source (no page faults for them);
    the dataset's scheduling settings live on its own context, not the process's DataContext."""
    from dataclasses import asdict

    import memory_faults
    import ray
    from memory_faults import steady_state_faults
    from ray.data.context import DataContext

    from pipelines.ingest import build_ingest_dataset, ingest_block
    from sora.process_memory import _glibc

    root, good, _ = mixed
    sources = sorted(good)
    before = DataContext.get_current().op_resource_reservation_enabled
    ratio_before = DataContext.get_current().downstream_capacity_backpressure_ratio
    ds = build_ingest_dataset(sources, str(tmp_path / "data"), IngestConfig(actors=2))
    assert ds.context.op_resource_reservation_enabled is False
    assert ds.context.downstream_capacity_backpressure_ratio is None
    assert DataContext.get_current().op_resource_reservation_enabled == before
    assert DataContext.get_current().downstream_capacity_backpressure_ratio == ratio_before
    assert sorted(json.loads(r["summary"])["source"] for r in ds.take_all()) == sources

    ray.cloudpickle.register_pickle_by_value(memory_faults)  # the workers import no test module

    @ray.remote(num_cpus=1)
    def decode_threads_and_faults_in_a_task(source: str, out: str) -> tuple[int, int]:
        from sora import video_io

        video_io.set_decode_threads(None)  # whatever an earlier task of this worker left
        ingest_block({"source": [source]}, out, asdict(IngestConfig()))
        return video_io._decode_threads, steady_state_faults()

    threads, faults = ray.get(decode_threads_and_faults_in_a_task.remote(sources[0], str(tmp_path / "one")))
    assert threads == 1
    if _glibc() is not None:  # 20,480 pages touched: every one faults where freed memory goes back
        assert faults < 400, f"{faults} page faults in an ingest worker for arrays freed and allocated again"
    assert video_io._decode_threads == 0  # the driver's own decoders keep the default


def test_killed_ray_worker_keeps_results_exactly_once(mixed, tmp_path, ray_session):
    root, good, _ = mixed
    clean = str(tmp_path / "clean")
    run_ingest([root], clean, IngestConfig())
    data = str(tmp_path / "killed")
    killed: list[int] = []

    def killer():
        import psutil

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            # this session's Ray workers only: never another run's on a shared machine
            for proc in psutil.Process().children(recursive=True):
                try:
                    line = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                if "ray::" in line and ("Map" in line or "stage" in line):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    run_ingest([root], data, IngestConfig())
    t.join()
    assert killed, "no Ray map worker was seen to kill"
    assert clip_rows(data) == clip_rows(clean)


def test_killed_run_restarted_gives_the_same_rows(mixed, tmp_path, monkeypatch):
    """The run is killed while one source's clips file is half-written (its temp file written,
    not yet renamed): the output shows no partial file, and the re-run removes the temp file,
    does the missing sources only and ends with the clean run's rows."""
    from pipelines.ingest import source_id

    root, good, _ = mixed
    data = str(tmp_path / "data")
    # a slow source keeps the first run busy long enough to be killed halfway, and one
    # source's writer stops between its temp file and the rename until the kill
    stalled = f"{source_id(sorted(p for p in good if p.endswith('.mp4'))[0])}.parquet"
    env = faulty_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ingest", root, "--out", data, "--probe-timeout", "20"],
                            env=stalled_writer_env(tmp_path, stalled), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    done_dir, clips_dir = os.path.join(data, "_done"), os.path.join(data, "clips")

    def temps() -> list[str]:
        return [n for n in os.listdir(clips_dir) if n.startswith(f".{stalled}.tmp-")] if os.path.isdir(clips_dir) else []

    deadline = time.monotonic() + 240  # Ray's start alone can take a minute on a loaded machine
    while time.monotonic() < deadline:
        if os.path.isdir(done_dir) and len(os.listdir(done_dir)) >= 3 and temps():
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-run and mid-write
    proc.wait()
    n_done = len([n for n in os.listdir(done_dir) if not n.startswith(".")])
    n_inputs = len(list_sources([root]))
    assert 3 <= n_done < n_inputs, f"kill came too late or too early: {n_done}/{n_inputs}"
    assert len(temps()) == 1 and not os.path.exists(os.path.join(clips_dir, stalled)), os.listdir(clips_dir)
    proc = run_cli(["ingest", root, "--out", data, "--probe-timeout", "3"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hidden_files(data) == []
    summary = storage.read_json(os.path.join(data, "_summary.json"))
    assert summary["stale_temps_removed"] >= 1
    # the killed run's Ray workers may finish a source or two before they notice: >= n_done
    assert summary["sources_skipped_already_done"] >= n_done
    assert summary["sources_processed"] == n_inputs - summary["sources_skipped_already_done"]  # none twice
    clean = str(tmp_path / "clean")
    worker = fault_worker()  # the same faults in this process's decode worker
    monkeypatch.setattr(video_io, "_WORKER", worker)
    try:
        run_sequential([root], clean, IngestConfig(probe_timeout=3))
    finally:
        worker.close()
    assert clip_rows(data) == clip_rows(clean)
    q1 = sorted(read_quarantine(data)["source"].to_pylist())
    q2 = sorted(read_quarantine(clean)["source"].to_pylist())
    assert q1 == q2


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    yield env
    server.stop()


def test_ingest_from_and_to_s3(mixed, s3_server, monkeypatch):
    import fsspec

    root, good, bad = mixed
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("videos")
    fs.mkdir("datasets")
    some = [p for p in good if "clip_" in p][:3] + [next(p for p in bad if p.endswith("random.mp4"))]
    for p in some:
        fs.put(p, f"videos/in/{os.path.basename(p)}")
    proc = run_cli(["ingest", "s3://videos/in", "--out", "s3://datasets/ds"], cli_env(**s3_server))
    assert proc.returncode == 0, proc.stderr[-3000:]
    clips = read_clips("s3://datasets/ds")
    quarantine = read_quarantine("s3://datasets/ds")
    assert sorted(clips["source"].to_pylist()) == sorted(f"s3://videos/in/{os.path.basename(p)}" for p in some[:3])
    assert quarantine["source"].to_pylist() == ["s3://videos/in/random.mp4"]
    assert fs.exists("datasets/ds/_summary.json")


def test_listing_expands_dirs_and_globs_and_rejects_missing(mixed):
    root, good, _ = mixed
    listed = list_sources([root])
    assert set(good) <= set(listed) and not any(p.endswith("captions.jsonl") for p in listed)
    assert list_sources([os.path.join(root, "*.webm")]) == sorted(p for p in good if p.endswith(".webm") and "more" not in p)
    with pytest.raises(FileNotFoundError):
        list_sources([os.path.join(root, "nope.mp4")])


def test_scene_cut_splits_and_short_tail_is_quarantined(tmp_path):
    import numpy as np
    from media import moving_box
    from sora.video_io import write_video

    a = moving_box(128, 72, 30, bg=(0, 0, 0))
    b = moving_box(128, 72, 30, bg=(128, 128, 128), direction=-1)
    tail = moving_box(128, 72, 4, bg=(0, 0, 120))
    src = str(tmp_path / "cuts.mp4")
    write_video(src, np.concatenate([a, b, tail]), 12)
    data = str(tmp_path / "data")
    run_sequential([src], data, IngestConfig())
    clips = read_clips(data)
    assert sorted(zip(clips["start_frame"].to_pylist(), clips["num_frames"].to_pylist())) == [(0, 30), (30, 30)]
    q = read_quarantine(data)
    assert q["start_frame"].to_pylist() == [60] and "too short" in q["reason"][0].as_py()


def test_static_and_tiny_and_extreme_aspect_are_filtered(tmp_path):
    import numpy as np
    from media import moving_box
    from sora.video_io import write_video

    write_video(str(tmp_path / "static.mp4"), np.full((20, 72, 128, 3), 90, np.uint8), 12)
    write_video(str(tmp_path / "tiny.mp4"), moving_box(24, 16, 20), 12)
    write_video(str(tmp_path / "wide.mp4"), moving_box(400, 80, 20), 12)
    data = str(tmp_path / "data")
    run_sequential([str(tmp_path)], data, IngestConfig())
    q = read_quarantine(data)
    reasons = {os.path.basename(s): r for s, r in zip(q["source"].to_pylist(), q["reason"].to_pylist())}
    assert "near-static" in reasons["static.mp4"]
    assert "too small" in reasons["tiny.mp4"]
    assert "extreme aspect" in reasons["wide.mp4"]
    assert read_clips(data).num_rows == 0


def test_config_checks_and_cli_flags_from_the_config():
    """Every IngestConfig field is a flag of `sora ingest` with its default in --help; a bad
    value is one clear error before any work starts."""
    import dataclasses

    with pytest.raises(ValueError, match="min_motion"):
        IngestConfig(min_motion=2.0)
    with pytest.raises(ValueError, match="resolution"):
        IngestConfig(resolution="123p")
    with pytest.raises(ValueError, match="max_aspect"):
        IngestConfig(max_aspect=0.5)
    env = cli_env()
    help_text = run_cli(["ingest", "--help"], env, timeout=120).stdout
    for f in dataclasses.fields(IngestConfig):
        assert "--" + f.name.replace("_", "-") in help_text, f.name
    assert "(default: 0.0005)" in help_text and "--no-crop-bars" in help_text
    bad = run_cli(["ingest", "nowhere", "--out", "x", "--scene-threshold", "7"], env, timeout=120)
    assert bad.returncode != 0 and "sora ingest: IngestConfig.scene_threshold" in bad.stderr


def test_source_blocks_shrink_toward_the_end_and_cover_every_source():
    from pipelines.ingest import source_blocks

    for n, workers in [(1, 2), (7, 2), (100, 2), (5000, 16), (3, 8)]:
        sizes = source_blocks(n, workers)
        assert sum(sizes) == n and min(sizes) >= 1 and max(sizes) <= max(16, -(-n // 256))  # 16 up to 4,096
        assert sizes == sorted(sizes, reverse=True), sizes  # the last blocks are the small ones
    assert source_blocks(100, 2)[-2:] == [1, 1]  # both workers finish on one source each
    assert source_blocks(0, 2) == []


def test_source_blocks_stay_as_many_however_large_the_corpus():
    """The driver keeps every input block until the run ends: past max_block * max_blocks
    sources the blocks grow instead of their count, and small corpora keep the small blocks."""
    from pipelines.ingest import source_blocks

    assert source_blocks(48, 2) == [12, 9, 7, 5, 4, 3, 2, 2, 1, 1, 1, 1]  # two tasks at once from the start
    assert max(source_blocks(4096, 2)) == 16
    for workers in (1, 2, 16, 64):
        counts = []
        for n in (5_000, 20_000, 100_000, 1_000_000, 10_000_000):
            sizes = source_blocks(n, workers)
            assert sum(sizes) == n and sizes == sorted(sizes, reverse=True), (n, workers)
            assert len(sizes) <= 256 + 8 * workers, (n, workers, len(sizes))
            counts.append(len(sizes))
        assert counts[-1] <= 1.05 * counts[1], (workers, counts)  # 500x the sources: flat, not just bounded
    sizes = source_blocks(1_000_000, 2)
    assert max(sizes) == -(-1_000_000 // 256) and min(sizes[:-1]) >= 1_000_000 // 2048


def test_summary_totals_equal_the_sums_of_the_summaries():
    from pipelines.ingest import SummaryTotals

    summaries = [
        {"clips": 2, "quarantined": 1, "source_failed": False, "stages": ["split"], "buckets": ["a", "b"],
         "seconds": {"probe": 0.5, "split": 1.0}},
        {"clips": 0, "quarantined": 1, "source_failed": True, "stages": ["probe"], "buckets": [],
         "seconds": {"probe": 0.25}},
        {"clips": 1, "quarantined": 0, "source_failed": False, "stages": [], "buckets": ["a"],
         "seconds": {"probe": 0.25, "split": 1.0}},
    ]
    totals = SummaryTotals()
    for s in summaries:
        totals.add(s)
    r = totals.result(listed=4, skipped=1, wall=2.0)
    assert (r["sources_listed"], r["sources_skipped_already_done"], r["sources_processed"]) == (4, 1, 2)
    assert (r["clips"], r["quarantine_rows"], r["sources_with_clips"], r["sources_rejected"]) == (3, 2, 2, 1)
    assert r["buckets"] == {"a": 2, "b": 1}
    assert r["sources_with_quarantine_by_stage"] == {"split": 1, "probe": 1}
    assert r["stage_cpu_seconds"] == {"probe": 1.0, "split": 2.0}
    assert r["sources_per_second"] == 1.0
