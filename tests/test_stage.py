"""The stage base class: a model-backed scorer written on it adds a column, loads its model once
per actor, quarantines a clip that fails (never crashes), writes its table exactly once, and runs
on a Ray Data actor pool without touching the caller's config."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.ingest import read_clips, read_quarantine
from pipelines.stage import (Stage, StageResources, batch_items, collect_stats, loads_in_process, own_fields_first,
                             resolve_resources)
from pipelines.storage import read_table
from sora.process_memory import MODEL_TRIM_MB, _glibc

SCORES_SCHEMA = pa.schema([("clip_id", pa.string()), ("brightness", pa.float64())])


@dataclass(kw_only=True)
class BrightnessConfig(StageResources):
    size: int = 16  # frames are decoded at size x size
    batch_size: int = 4  # clips per call


class BrightnessScorer(Stage):
    """A scorer in the shape curation scorers take: a "model" (mean over RGB) loaded in setup,
    a pure per-clip method that adds a `brightness` column."""

    name = "brightness"
    config_cls = BrightnessConfig

    def setup(self) -> None:
        self.model = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.constant_(self.model.weight, 1 / 3)
        self.model.to(self.device)

    def process_item(self, clip: dict) -> dict:
        from sora.video_io import read_frames

        frames = read_frames(clip["source"], [int(clip["start_frame"])], size=(self.cfg.size, self.cfg.size))
        x = torch.from_numpy(frames).float().to(self.device) / 255.0  # (1, H, W, 3)
        with torch.no_grad():
            return {**clip, "brightness": float(self.model(x).mean())}


class BrightnessTable(BrightnessScorer):
    """The same scorer writing its own table (DATA/scores) instead of passing rows on."""

    output = "scores"
    schema = SCORES_SCHEMA

    def process_item(self, clip: dict) -> dict:
        return {"clip_id": clip["clip_id"], "brightness": super().process_item(clip)["brightness"]}


def as_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """What Ray Data hands a stage: one numpy column per key."""
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture()
def data(shapes_ds, tmp_path):
    d = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, d)
    return d


def test_a_scorer_adds_a_column_loads_once_and_quarantines_a_bad_clip(data, tmp_path):
    clips = read_clips(data).to_pylist()[:5]
    broken = dict(clips[2], source=str(tmp_path / "gone.mp4"))  # its file vanished after ingest
    import gc

    from sora.process_memory import frozen_objects

    before, frozen = loads_in_process("brightness"), frozen_objects()
    scorer = BrightnessScorer({"size": 8}, out=data)
    assert gc.isenabled() and frozen_objects() == frozen  # outside an actor its set-up only pauses the collector
    first = scorer(as_batch(clips[:2] + [broken]))
    second = scorer(as_batch(clips[3:]))
    assert loads_in_process("brightness") == before + 1  # one setup, however many batches
    assert scorer.device == "cpu" and scorer.cfg == BrightnessConfig(size=8)
    # the good clips come back with every column plus the score; the broken one is dropped
    assert list(first["clip_id"]) == [clips[0]["clip_id"], clips[1]["clip_id"]]
    assert set(first) == set(clips[0]) | {"brightness"} and list(second["clip_id"]) == [c["clip_id"] for c in clips[3:]]
    from sora.video_io import read_frames

    frame = read_frames(clips[0]["source"], [clips[0]["start_frame"]], size=(8, 8)).astype(np.float64) / 255.0
    assert first["brightness"][0] == pytest.approx(frame.mean(), abs=1e-6)
    q = [r for r in read_quarantine(data).to_pylist() if r["stage"] == "brightness"]
    assert len(q) == 1 and q[0]["clip_id"] == broken["clip_id"] and q[0]["source"] == broken["source"]
    assert q[0]["reason"]  # why, in words


def test_a_writing_stage_writes_each_batch_once_under_one_name(data):
    clips = read_clips(data).to_pylist()[:3]
    stage = BrightnessTable(BrightnessConfig(), out=data)
    stats = stage(as_batch(clips))
    assert (stats["ok"], stats["failed"], stats["pid"], stats["model_loads"]) == ([3], [0], [os.getpid()],
                                                                                   [loads_in_process("brightness")])
    again = stage(as_batch(clips[::-1]))  # a retried batch (any order) rewrites the same file
    assert again["ok"] == [3]
    files = os.listdir(os.path.join(data, "scores"))
    assert len(files) == 1 and files[0] == f"{stage.batch_id([c['clip_id'] for c in clips])}.parquet"
    table = read_table(os.path.join(data, "scores"), schema=SCORES_SCHEMA)
    assert sorted(table["clip_id"].to_pylist()) == sorted(c["clip_id"] for c in clips)


def test_on_an_actor_pool_the_callers_config_is_left_alone(data, ray_session):
    import ray

    from pipelines.ray_utils import table_blocks

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors import no test module
    cfg = BrightnessConfig(actors=3)  # more than the 2 CPUs here hold: the pool starts with those that fit
    assert resolve_resources(cfg).num_gpus == 0.0 and cfg.num_gpus is None  # no GPUs here; cfg untouched
    from pipelines.ingest_config import IngestConfig

    sized = IngestConfig(actors=None)  # a pool left to the cluster: one per CPU of it
    assert resolve_resources(sized).actors == int(ray.cluster_resources()["CPU"]) and sized.actors is None
    clips = read_clips(data)
    ds = BrightnessTable.apply(ray.data.from_arrow(table_blocks(clips, cfg.batch_size)), cfg, out=data,
                               batch_size=cfg.batch_size)
    seen = []
    stats = collect_stats(ds, clips.num_rows, lambda done, total: seen.append((done, total)))
    assert cfg.num_gpus is None  # still: the actors got a resolved copy
    assert stats["ok"] == clips.num_rows and stats["failed"] == 0
    assert stats["batches"] == -(-clips.num_rows // cfg.batch_size) and 1 <= len(stats["actors"]) <= 2
    assert set(stats["model_loads_per_actor"].values()) == {1}  # one load per actor for all its batches
    assert stats["batches_per_node"] == {ray.get_runtime_context().get_node_id(): stats["batches"]}  # one node here
    assert seen[-1] == (clips.num_rows, clips.num_rows)
    scores = read_table(os.path.join(data, "scores"), schema=SCORES_SCHEMA)
    assert sorted(scores["clip_id"].to_pylist()) == sorted(clips["clip_id"].to_pylist())


def test_config_checks_raise_value_errors_and_flags_put_resources_last():
    with pytest.raises(ValueError, match="actors must be at least 1"):
        BrightnessConfig(actors=0)
    with pytest.raises(ValueError, match="num_gpus"):
        BrightnessConfig(num_gpus=-1)
    assert own_fields_first(BrightnessConfig) == ["size", "batch_size", "actors", "num_gpus", "torch_threads"]
    assert batch_items({"a": np.array([1, 2]), "b": np.array(["x", "y"])}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]


def test_load_item_runs_ahead_of_process_item_and_a_failed_load_is_quarantined():
    """`each` with a loader: item i+1 loads on a background thread while item i is processed (a
    process that waits for the next load would time out otherwise), in order, and an item whose
    load raises is quarantined while the others go on."""
    import threading

    items = [{"clip_id": str(i)} for i in range(6)]
    loaded = {i: threading.Event() for i in range(len(items))}
    threads = set()

    def load(item):
        i = int(item["clip_id"])
        threads.add(threading.current_thread().name)
        if i == 3:
            raise ValueError("corrupt file")
        loaded[i].set()
        return i * 10

    def process(item, value):
        i = int(item["clip_id"])
        nxt = i + 1 if i + 1 != 3 else None
        if nxt is not None and nxt < len(items):  # the next item's load is under way meanwhile
            assert loaded[nxt].wait(timeout=30), f"item {nxt} did not load while item {i} was processed"
        return {"clip_id": item["clip_id"], "value": value}

    done, errors = Stage.each(items, process, load=load, ahead=1)
    assert [row for _, row in done] == [{"clip_id": str(i), "value": i * 10} for i in (0, 1, 2, 4, 5)]
    assert errors == [(items[3], "ValueError: corrupt file")]
    assert threads and threading.current_thread().name not in threads  # loads ran on the background thread

    # in turn (ahead=0) the same results, every load on the calling thread
    threads.clear()
    serial, serial_errors = Stage.each(items, lambda item, value: {"clip_id": item["clip_id"], "value": value},
                                       load=load, ahead=0)
    assert [row for _, row in serial] == [row for _, row in done] and serial_errors == errors
    assert threads == {threading.current_thread().name}


def test_actors_left_to_the_cluster_fill_its_cpus_at_their_thread_count(ray_session):
    import ray

    from pipelines.stage import actor_cpus

    cpus = int(ray.cluster_resources()["CPU"])
    assert actor_cpus(None) == 1 and actor_cpus(3) == 3
    assert resolve_resources(BrightnessConfig(actors=None)).actors == cpus  # one per CPU: every core busy
    assert resolve_resources(BrightnessConfig(actors=None, torch_threads=2)).actors == max(1, cpus // 2)
    assert resolve_resources(BrightnessConfig(actors=None, torch_threads=64)).actors == 1  # at least one
    assert resolve_resources(BrightnessConfig(actors=5, torch_threads=2)).actors == 5  # given: kept


class SlowModel(Stage):
    """A map stage whose items load ahead (`load_item`) of a slow "model" (`process_item`): each
    row says when its load started and when its model call ran, in which process and batch."""

    name = "slow_model"
    config_cls = BrightnessConfig

    def load_item(self, clip: dict) -> float:
        import time

        return time.time()

    def process_item(self, clip: dict, load_start: float) -> dict:
        import time

        start = time.time()
        time.sleep(0.5)
        from sora.process_memory import frozen_objects, kept_memory

        return {"clip_id": clip["clip_id"], "load_start": load_start, "model_start": start, "model_end": time.time(),
                "pid": os.getpid(), "kept_memory": str(kept_memory()), "frozen": frozen_objects()}

    def process(self, items):
        out = super().process(items)
        for row in out.rows:
            row["batch"] = items[0]["clip_id"]
        return out


def test_an_actor_loads_its_next_batch_while_this_one_is_in_the_models(ray_session):
    """Two batches in one actor at once: the second one's first items load while the first one
    is still in the models, and model calls never overlap: one batch in the models at a time,
    the oldest first."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors import no test module
    cfg = BrightnessConfig(actors=1, batch_size=3)
    assert SlowModel.calls_per_actor(cfg) == 2 and BrightnessScorer.calls_per_actor(cfg) == 1
    items = pa.table({"clip_id": [f"c{i}" for i in range(9)]})
    ds = SlowModel.apply(ray.data.from_arrow([items.slice(i, 3) for i in range(0, 9, 3)]), cfg, out=None,
                         batch_size=3)
    rows = sorted(ds.take_all(), key=lambda r: r["model_start"])
    assert sorted(r["clip_id"] for r in rows) == [f"c{i}" for i in range(9)] and len({r["pid"] for r in rows}) == 1
    if _glibc() is not None:  # the actor keeps its models' freed activations for the next item
        assert {r["kept_memory"] for r in rows} == {str((MODEL_TRIM_MB, None))}
    # what the actor's set-up loaded (torch, its model) is frozen: the collector does not walk it again
    assert min(r["frozen"] for r in rows) > 100_000, rows
    for a, b in zip(rows, rows[1:]):
        assert a["model_end"] <= b["model_start"], (a, b)  # one model call at a time
    order = [r["batch"] for r in rows]
    runs = [b for i, b in enumerate(order) if i == 0 or b != order[i - 1]]
    # batch by batch: the two that came together in either order, the third (dispatched when one
    # of them ended) after the other
    assert sorted(runs[:2]) == ["c0", "c3"] and runs[2:] == ["c6"], order
    assert any(r["load_start"] < o["model_end"] and r["load_start"] > o["model_start"]
               for r in rows for o in rows if o["batch"] != r["batch"])  # a load beside another batch's model call


def test_in_turn_lets_the_oldest_batch_use_the_models_until_it_ends():
    import threading

    from pipelines.stage import InTurn

    turns, log = InTurn(), []
    a_queued, b_loaded = threading.Event(), threading.Event()

    def batch(name: str) -> None:
        with turns.queued() as ticket:
            if name == "a":
                a_queued.set()
            log.append(f"{name} loads")  # loading waits for no turn
            if name == "b":
                b_loaded.set()
            for i in range(2):
                turns.wait(ticket)
                log.append(f"{name} model {i}")
                if name == "a" and i == 0:
                    assert b_loaded.wait(timeout=10)  # b loads while a is in the models

    a = threading.Thread(target=batch, args=("a",))
    a.start()
    assert a_queued.wait(timeout=10)
    b = threading.Thread(target=batch, args=("b",))
    b.start()
    a.join(timeout=10), b.join(timeout=10)
    assert log.index("b loads") < log.index("a model 1")
    assert [e for e in log if "model" in e] == ["a model 0", "a model 1", "b model 0", "b model 1"]


def test_a_batch_that_leaves_its_turn_lets_the_next_one_in_while_it_goes_on():
    import threading

    from pipelines.stage import InTurn

    turns, log = InTurn(), []
    a_left, b_done = threading.Event(), threading.Event()

    def a() -> None:
        with turns.queued() as ticket:
            turns.wait(ticket)
            log.append("a model")
            b_thread.start()
            turns.leave(ticket)
            turns.leave(ticket)  # twice: no-op
            a_left.set()
            assert b_done.wait(timeout=10)  # b had the models while a was still running
            log.append("a writes")
            try:
                turns.wait(ticket)
            except RuntimeError as e:
                log.append(f"a cannot wait again: {e}")

    def b() -> None:
        with turns.queued() as ticket:
            turns.wait(ticket)
            log.append("b model")
        b_done.set()

    b_thread = threading.Thread(target=b)
    a_thread = threading.Thread(target=a)
    a_thread.start()
    a_thread.join(timeout=20), b_thread.join(timeout=20)
    assert log == ["a model", "b model", "a writes",
                   "a cannot wait again: this batch left its turn: it cannot wait for it again"], log
