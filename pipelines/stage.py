"""A stage of a Ray Data pipeline: one class per stage, one shape for all of them.

    @dataclass(kw_only=True)
    class ScoreConfig(StageResources):
        model: str                      # the scorer's weights
        batch_size: int = 16            # clips per call

    class ScoreStage(Stage):
        name = "score"                  # the quarantine table's `stage`
        config_cls = ScoreConfig

        def setup(self):                # once per actor, on self.device
            self.model = load(self.cfg.model, device=self.device)

        def process_item(self, clip):   # pure: one item in, its output row out (or raise)
            return {**clip, "score": float(self.model(read_frames(clip["source"])))}

    ds = ScoreStage.apply(ray.data.from_arrow(blocks), cfg, out=DATA, batch_size=cfg.batch_size)

The base class does the rest, the same way for every stage (cosmos-curate's and NeMo Curator's
stage interface; Ray's batch-inference pattern underneath: a callable class per actor):

- resources are declared by the config (`StageResources`: actors, GPUs per actor, threads);
  `resolve_resources` fills in GPUs, and the pool size where a config leaves it to the cluster
  (``actors=None``: one actor per GPU, or per ``torch_threads`` CPUs, 1 by default: every core
  busy), without touching the caller's config;
- the pool hands out no batch before its actors have loaded their models (as many as the
  cluster holds; it grows to the configured size as nodes join), and each actor holds one
  batch at a time (two for a stage with `load_item`, below, or that says so in
  `calls_per_actor`, as captioning does): the work spreads over the whole
  pool, and every node of it, however short the job;
- the device is resolved once per actor and the model loaded once (`setup`), counted per
  stage name in `loads_in_process` so a test or a stats row can show it; the process keeps the
  memory its models free for the next item (`sora.process_memory`: a model's large activations
  would otherwise come back from the kernel as fresh pages on every item), and its set-up runs
  with Python's collector paused, what it loaded frozen after it in an actor (never walked
  again, at the actor's exit neither);
- `process` maps one batch; by default it calls `process_item` on each item, and an item that
  raises becomes a quarantine row (`DATA/quarantine/<stage>-<hash>.parquet`) - never a crash;
- a stage whose items wait on another process or on I/O (a decode subprocess, a remote read)
  splits that part out as `load_item`: it runs on a background thread ``prefetch`` items ahead,
  so the next clip decodes while the model works on this one (`process_item(item, loaded)`); an
  item whose load fails is quarantined like any other. Such an actor runs two batches at once
  (`calls_per_actor`), one of them in the models at a time (`InTurn`): the next batch's
  first items load while this batch's last one is in the models, so no batch starts by waiting
  for its first load, and the last batches end together on every actor;
- a stage with an `output` table writes its rows there atomically under a name hashed from the
  batch's ids (`DATA/<output>/<hash>.parquet`): a retried batch rewrites the same file, so
  results are exactly-once though Ray runs work at least once. It returns one stats row per
  batch (pid, Ray node, model loads, seconds, ok/failed counts, the stage's own counters) that
  `collect_stats` sums on the driver. A stage without `output` is a map: it returns its rows
  (e.g. the clips with a score column added) for the next stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from typing import TYPE_CHECKING

from sora.process_memory import keep_model_memory, loading_paused

if TYPE_CHECKING:  # imported where used: a config built for command-line flags loads no pyarrow
    import numpy as np
    import pyarrow as pa


# stage name -> how many times its `setup` ran in this process. Kept here, not on the class: a
# subclass (or the wrapper Ray Data makes of a stage class) would start from its parent's count.
_LOADS: dict[str, int] = {}

# How long a stage waits for its actors to be placed and load their models before it fails (a
# model that never loads; a cluster whose other work keeps the resources for longer).
ACTOR_START_TIMEOUT_S = 1800


def loads_in_process(name: str) -> int:
    """How many times stage ``name`` loaded its model in this process."""
    return _LOADS.get(name, 0)


class MissingInputError(FileNotFoundError):
    """A stage found nothing it could work on because an earlier step has not run (or made
    nothing); the message names the command that makes its input."""


@dataclass(kw_only=True)
class StageResources:
    """What each actor of a stage's pool gets: the fields every stage config starts with."""

    actors: int = 1  # actor pool size: one model copy per actor
    num_gpus: float | None = None  # GPUs per actor; None: 1 where the Ray cluster has GPUs, else 0
    # intra-op threads per actor, the CPUs it reserves (None: 1, which Ray makes torch's default there)
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:  # a config may allow None: sized from the cluster
            raise ValueError(f"actors must be at least 1, got {self.actors}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0 (or None: from the cluster), got {self.num_gpus}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be at least 1 (or None: torch's default), got {self.torch_threads}")


def own_fields_first(cls: type) -> list[str]:
    """A stage config's field names, its own first and the `StageResources` ones last (the
    order its command-line flags read best in)."""
    shared = [f.name for f in dataclasses.fields(StageResources)]
    return [f.name for f in dataclasses.fields(cls) if f.name not in shared] + shared


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (0 when Ray is not started here)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def resolve_num_gpus(num_gpus: float | None) -> float:
    """GPUs per actor or replica: ``num_gpus`` when given, else 1 where the cluster has GPUs."""
    return float(num_gpus) if num_gpus is not None else (1.0 if cluster_gpus() > 0 else 0.0)


def cluster_cpus() -> float:
    """CPUs in the Ray cluster (this machine's when Ray is not started here)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else float(os.cpu_count() or 1)


def cluster_fit(num_gpus: float, cpus: int = 1) -> int:
    """How many actors of ``cpus`` CPUs (and ``num_gpus`` GPUs) the cluster holds, all of it
    counted (what runs there now is let finish): at least 1."""
    fit = cluster_cpus() / cpus
    if num_gpus > 0:
        fit = min(fit, cluster_gpus() / num_gpus)
    return max(1, int(fit))


def actor_cpus(torch_threads: int | None) -> int:
    """CPUs one actor reserves: its intra-op threads (1 when left to the default). Ray sets
    OMP_NUM_THREADS to an actor's CPUs, so torch's default thread count in it is this number."""
    return int(torch_threads or 1)


def resolve_actors(actors: int | None, num_gpus: float, torch_threads: int | None = None) -> int:
    """Actor pool size: ``actors`` when given, else as many as the cluster holds at
    `actor_cpus` CPUs each (and ``num_gpus`` GPUs each, for a GPU stage): every core busy."""
    return int(actors) if actors is not None else cluster_fit(num_gpus, actor_cpus(torch_threads))


def _let_short_tasks_finish(cpus: float, timeout: float = 5.0) -> None:
    """Wait (at most ``timeout`` s) until the cluster shows ``cpus`` CPUs free. The input of a
    stage is often made just before its pool starts, by tasks that still hold CPUs in the
    cluster's view for a moment (``ray.data.from_arrow`` runs one per block): actors placed
    then ("SPREAD") skip the nodes that look busy and double up on others."""
    import ray

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < cpus and time.monotonic() < deadline:
        time.sleep(0.1)


def resolve_resources(cfg):
    """A copy of a config with ``num_gpus`` resolved (`resolve_num_gpus`) and ``actors`` (see
    `resolve_actors`); ``cfg`` is untouched."""
    num_gpus = resolve_num_gpus(cfg.num_gpus)
    actors = resolve_actors(cfg.actors, num_gpus, getattr(cfg, "torch_threads", None))
    return dataclasses.replace(cfg, num_gpus=num_gpus, actors=actors)


def device_for(num_gpus: float | None) -> str:
    """"cuda" when this process may use a GPU and has one, else "cpu" (None: any GPU it has)."""
    import torch

    return "cuda" if torch.cuda.is_available() and (num_gpus is None or num_gpus > 0) else "cpu"


def error_reason(e: BaseException) -> str:
    """A quarantine reason: the error's own ``reason`` (e.g. `sora.video_io.VideoError`) or its type and text."""
    return getattr(e, "reason", None) or f"{type(e).__name__}: {e}"


def batch_items(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray Data numpy batch -> one dict per row, numpy scalars as Python values."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()} for i in range(n)]


class InTurn:
    """Batches take turns, in the order they arrived: the oldest batch still running has the
    turn until it ends or gives it up (``queued`` when a batch starts, ``wait`` before each use of
    what they share, ``leave`` once it no longer needs it).

        with turns.queued() as ticket:
            load(...)           # any time
            turns.wait(ticket)  # then the models, once every older batch has ended (or left)
            ...
            turns.leave(ticket) # optional, as leaving the block: what follows runs beside the next batch's models
    """

    def __init__(self) -> None:
        import collections
        import threading

        self._changed = threading.Condition()
        self._queue: collections.deque = collections.deque()

    @contextlib.contextmanager
    def queued(self):
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
        try:
            yield ticket
        finally:
            self.leave(ticket)

    def wait(self, ticket: object) -> None:
        with self._changed:
            if ticket not in self._queue:
                raise RuntimeError("this batch left its turn: it cannot wait for it again")
            self._changed.wait_for(lambda: self._queue[0] is ticket)

    def leave(self, ticket: object) -> None:
        """Give the turn up (or the place in line) before the batch ends; no-op when done already."""
        with self._changed:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._changed.notify_all()


@dataclass
class StageOutput:
    """What ``process`` makes of one batch: output ``rows``, ``errors`` as (item, reason) for
    the quarantine, and the stage's own ``counters`` (summed over batches by `collect_stats`;
    "ok" and "failed" there replace the counts of rows and errors, e.g. for error rows kept in
    the output as bulk generation's manifest keeps them)."""

    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors: list[tuple[dict[str, Any], str]] = dataclasses.field(default_factory=list)
    counters: dict[str, float] = dataclasses.field(default_factory=dict)


class Stage:
    """A Ray Data callable class (see the module docstring). Subclasses set ``name``,
    ``config_cls`` (a `StageResources` dataclass), and for a writing stage ``output`` and
    ``schema``; they implement ``setup`` and ``process_item`` (or ``process`` for a batch)."""

    name: ClassVar[str] = "stage"  # the quarantine table's `stage` value and file prefix
    config_cls: ClassVar[type] = StageResources
    output: ClassVar[str | None] = None  # table directory under `out` the rows go to; None: rows pass on
    schema: ClassVar[pa.Schema | None] = None  # the output table's schema
    id_column: ClassVar[str] = "clip_id"  # names an item and an output row (file names hash it)
    # items `load_item` runs ahead of `process_item` on a background thread (each held in memory
    # until processed): what overlaps a decode subprocess or a read with the model's work. A
    # stage may set it per instance from its config.
    prefetch: int = 1

    def __init__(self, cfg: Any, out: str | None = None):
        from pipelines.ray_utils import in_actor

        # the imports and models a set-up makes are kept to the actor's end: the collector does
        # not walk them while they load, nor after (frozen) where this process is the stage's
        # actor; elsewhere (a loop, a test) it is only paused (`sora.process_memory.loading_paused`)
        with loading_paused(freeze=in_actor()):
            self._set_up(cfg, out)

    def _set_up(self, cfg: Any, out: str | None) -> None:
        import torch

        from pipelines.ray_utils import node_id

        self.cfg = cfg if isinstance(cfg, self.config_cls) else self.config_cls(**cfg)
        self.out = out
        self.pid = os.getpid()
        self.node = node_id()
        if getattr(self.cfg, "torch_threads", None):
            torch.set_num_threads(self.cfg.torch_threads)
        # a model's activations, freed after each item, stay in the process for the next one
        # instead of coming back from the kernel as fresh pages (`sora.process_memory`)
        keep_model_memory()
        self.device = device_for(getattr(self.cfg, "num_gpus", None))
        # of the batches in this actor at once (`calls_per_actor`), the one whose items go
        # through `process_item` now (the oldest); the others' items load meanwhile
        self.models_turn = InTurn()
        t0 = time.perf_counter()
        self.setup()
        _LOADS[self.name] = loads_in_process(self.name) + 1
        self.setup_seconds = time.perf_counter() - t0

    # -- what a stage implements -----------------------------------------------------------

    def setup(self) -> None:
        """Load models onto ``self.device``: once per actor."""

    def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        """One item -> its output row; raise for an item that fails (it is quarantined). A stage
        with `load_item` takes its result too: ``process_item(item, loaded)``."""
        raise NotImplementedError(f"{type(self).__name__} implements process_item or process")

    def load_item(self, item: dict[str, Any]) -> Any:
        """Optional: the part of one item that waits on another process or on I/O (decode its
        frames, fetch a file), run on a background thread ``prefetch`` items ahead of
        `process_item`; it must not touch what `process_item` changes. Raise for an item that
        fails (it is quarantined)."""
        raise NotImplementedError

    def process(self, items: list[dict[str, Any]]) -> StageOutput:
        """One batch -> StageOutput. By default `process_item` on each item (see `each`), its
        `load_item` ahead of it where the stage has one (then one batch in `process_item` at a
        time per actor, the oldest first: ``models_turn``)."""
        if not self.loads_ahead():
            done, errors = self.each(items, self.process_item)
        else:
            with self.models_turn.queued() as ticket:
                def in_turn(item: dict[str, Any], loaded: Any) -> Any:
                    self.models_turn.wait(ticket)
                    return self.process_item(item, loaded)

                done, errors = self.each(items, in_turn, load=self.load_item, ahead=self.prefetch)
        return StageOutput([row for _, row in done], errors)

    def loads_ahead(self) -> bool:
        """Whether `load_item` runs ahead of `process_item` (a stage with `load_item` and ``prefetch``)."""
        return self._loads_ahead_at(self.prefetch)

    @classmethod
    def _loads_ahead_at(cls, prefetch: int) -> bool:
        return cls.load_item is not Stage.load_item and prefetch >= 1

    @classmethod
    def calls_per_actor(cls, cfg: Any) -> int:
        """Batches an actor holds at once: 2 for a stage whose items load ahead (`load_item`,
        ``prefetch`` from its config or class), so that the next batch's first items load while
        this batch's last ones are in the models (one batch in the models at a time, the
        oldest first: ``models_turn``); else 1: a batch queued behind another on a busy actor
        would wait while an idle actor could take it."""
        return 2 if cls._loads_ahead_at(getattr(cfg, "prefetch", cls.prefetch)) else 1

    def quarantine_row(self, item: dict[str, Any], reason: str) -> dict[str, Any]:
        """The quarantine row of a failed clip (the `pipelines.ingest` quarantine contract)."""
        return {"source": str(item["source"]), "reason": reason, "stage": self.name, "clip_id": str(item["clip_id"]),
                "start_frame": int(item["start_frame"]), "num_frames": int(item["num_frames"])}

    # -- helpers for subclasses ----------------------------------------------------------

    @staticmethod
    def each(items: list[dict[str, Any]], fn: Callable[..., Any], *,
             load: Callable[[dict[str, Any]], Any] | None = None, ahead: int = 1) -> tuple[list, list]:
        """``fn`` on every item: ([(item, result)], [(item, reason)]); one failure never stops the batch.

        With ``load``: ``fn(item, load(item))``, where ``load`` runs in order on one background
        thread, at most ``ahead`` items in front of ``fn`` (0: in turn, on this thread). An item
        whose ``load`` raises is quarantined without ``fn``; the others go on."""
        done, errors = [], []
        if load is None or ahead < 1:
            for item in items:
                try:
                    done.append((item, fn(item) if load is None else fn(item, load(item))))
                except Exception as e:  # noqa: BLE001 - any per-item failure is that item's quarantine reason
                    errors.append((item, error_reason(e)))
            return done, errors
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-load") as pool:
            pending = [pool.submit(load, item) for item in items[:ahead]]
            for i, item in enumerate(items):
                future = pending.pop(0)
                if i + ahead < len(items):  # queued now, it runs while ``fn`` works on this item
                    pending.append(pool.submit(load, items[i + ahead]))
                try:
                    done.append((item, fn(item, future.result())))
                except Exception as e:  # noqa: BLE001 - a failed load or process: this item's quarantine reason
                    errors.append((item, error_reason(e)))
        return done, errors

    def batch_id(self, ids: list[str]) -> str:
        """The deterministic name of a batch's output file: a hash of its ids."""
        from pipelines import storage

        return storage.stable_id(*sorted(ids))

    # -- the Ray Data side -----------------------------------------------------------------

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import pyarrow as pa

        from pipelines import storage

        t0 = time.perf_counter()
        items = batch_items(batch)
        result = self.process(items)
        if result.errors:
            from pipelines.clips import QUARANTINE_SCHEMA

            rows = [self.quarantine_row(item, reason) for item, reason in result.errors]
            err_id = storage.stable_id(f"{self.name}-errors", *sorted(r["clip_id"] for r in rows))
            storage.write_parquet_atomic(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA),
                                         storage.join(self.out, "quarantine", f"{self.name}-{err_id}.parquet"))
        if self.output is None:  # a map stage: its rows go on to the next stage
            columns = result.rows[0] if result.rows else items[0] if items else {}
            return {k: [r[k] for r in result.rows] for k in columns}
        if result.rows:
            name = self.batch_id([str(r[self.id_column]) for r in result.rows])
            storage.write_parquet_atomic(pa.Table.from_pylist(result.rows, schema=self.schema),
                                         storage.join(self.out, self.output, f"{name}.parquet"))
        stats = {"ok": len(result.rows), "failed": len(result.errors), "pid": self.pid, "node": self.node,
                 "model_loads": loads_in_process(self.name), "seconds": time.perf_counter() - t0,
                 **result.counters}
        return {k: [v] for k, v in stats.items()}

    @classmethod
    def apply(cls, ds, cfg: Any, *, out: str | None, batch_size: int, **constructor):
        """``ds.map_batches`` with this stage on an actor pool of ``cfg.actors`` actors, each
        with the config's resources (resolved by `resolve_resources`; ``cfg`` is untouched).

        No batch is handed out before the pool's actors have loaded their models (Ray Data's
        ``wait_for_min_actors_s`` on this dataset's context): otherwise the first actor ready
        takes batch after batch while the others still load, and a short job runs on one
        actor, one node. Where the cluster holds fewer than ``cfg.actors`` (`cluster_fit`: a
        small or still-growing cluster), the pool starts with those and grows when nodes join.
        Each actor reserves `actor_cpus` CPUs, its torch threads (Ray sets OMP_NUM_THREADS,
        hence torch's default, to that number).
        Each actor holds `calls_per_actor` batches at a time, both running (threads of the
        actor): one, or two for a stage whose items load ahead of its models."""
        import ray

        cfg = resolve_resources(cfg)
        cpus = actor_cpus(getattr(cfg, "torch_threads", None))
        start = min(cfg.actors, cluster_fit(cfg.num_gpus, cpus))
        _let_short_tasks_finish(start * cpus)
        calls = cls.calls_per_actor(cfg)
        sizes = {"size": cfg.actors} if start == cfg.actors else \
            {"min_size": start, "max_size": cfg.actors, "initial_size": start}
        pool = ray.data.ActorPoolStrategy(**sizes, max_tasks_in_flight_per_actor=calls,
                                          max_concurrent_calls_per_actor=calls, enable_true_multi_threading=calls > 1)
        ds = ds.map_batches(
            cls,
            fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg), "out": out, **constructor},
            batch_size=batch_size,
            batch_format="numpy",
            compute=pool,
            num_cpus=cpus,
            num_gpus=cfg.num_gpus,
        )
        # the context this dataset shares with its inputs (Ray Data's copy made with them), not the process's
        ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        return ds


def collect_stats(ds, total: int | None = None, progress: Callable[[int, int | None], None] | None = None) -> dict:
    """Run a writing stage's dataset to the end and sum its stats rows: ok, failed, the stage's
    counters, ``batches``, ``actors`` (worker pids), ``model_loads_per_actor`` and
    ``batches_per_node`` (Ray node id -> batches its actors finished). ``progress`` is called
    with (items done, ``total``) after each batch."""
    sums: dict[str, float] = {"ok": 0, "failed": 0}
    loads: dict[int, int] = {}
    nodes: dict[str, int] = {}
    batches = 0
    for row in ds.iter_rows():
        batches += 1
        for k, v in row.items():
            if k not in ("pid", "node", "model_loads", "seconds"):
                sums[k] = sums.get(k, 0) + v
        pid = int(row["pid"])
        loads[pid] = max(loads.get(pid, 0), int(row["model_loads"]))
        if row.get("node"):
            nodes[str(row["node"])] = nodes.get(str(row["node"]), 0) + 1
        if progress is not None:
            progress(int(sums["ok"] + sums["failed"]), total)
    out: dict[str, Any] = {k: int(v) if float(v).is_integer() else v for k, v in sums.items()}
    out.update(batches=batches, actors=sorted(loads), model_loads_per_actor={str(p): n for p, n in loads.items()},
               batches_per_node=nodes)
    return out
