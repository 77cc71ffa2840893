"""Multi-node scenarios on `ray.cluster_utils.Cluster`: a head and two worker nodes on this one
machine, each its own raylet and object store, the data on a loopback S3 server.

    python tests/multinode_scenarios.py WORKDIR RESULT_JSON [PARTS]     # PARTS: stages,training

A test process can be connected to one Ray only, and the test session already has its own, so
tests/test_multinode.py runs this script in a subprocess and asserts on the JSON it writes: raw
facts (table rows, which node did which work, what the held upload saw, counts of every run),
no verdicts. What it runs, in order, on one cluster:

1. clean runs of ingest, encode and bulk generation on all three nodes (the reference tables);
2. the same stages again into new outputs, each losing a worker node mid-run: the loopback S3
   server holds one upload of the stage's output (a temp Parquet or video file) after its body
   arrived, the node whose Ray worker sent it is killed (no graceful shutdown), then the upload
   is let go; an upload whose sender is gone by then is dropped, as S3 drops one cut off mid-body.
   Ray retries the lost work on the nodes left; a fresh node then joins for the next stage;
3. an ingest whose driver stops right after it lost a node (what a killed job leaves), then the
   same ingest again: it does only the sources the first left undone;
4. DiT training with one worker per node (placement "spread"), checkpoints (DCP shards of every
   rank) in S3: once a checkpoint is registered, the next one's upload from a worker node is
   held and that node killed, so the checkpoint being written is never registered; Ray Train
   restarts the group on the nodes left, which resumes from the last registered checkpoint and
   trains to the last step (without the latents of part "stages", a small latents table is
   written first).

Nodes: the head has 2 CPUs, each worker node 1 (logical CPUs: the machine may have fewer
cores). Every stage starts on an idle cluster, and a stage's pool waits for all its actors
before it hands out work (`pipelines.stage.Stage.apply`), so its three actors (Ray Data's
"SPREAD") or three training workers take one node each and every node gets work; the head's
second CPU takes the actor (or worker) a lost node had. The cluster's address file goes to a
private RAY_TMPDIR, so no other `ray.init()` on the machine joins it. The head's GCS declares
a killed node dead within seconds (`HEALTH_CHECKS`). MULTINODE_KEEP_LOGS=1 keeps Ray's logs
of a failed run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
BUCKET = "multinode"
S3 = f"s3://{BUCKET}"
WAIT_S = 400.0  # longest wait for a run or a node on a busy machine (a wait, never a check)
# The GCS declares a node dead after this many failed health checks in a row, one a second (Ray's
# defaults: 5 every 3 s, after 5 s): a killed raylet refuses at once, so its work is retried
# after ~3 s instead of ~20; a live one on a loaded machine still has 3 x 5 s to answer.
HEALTH_CHECKS = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 5000, "health_check_failure_threshold": 3}


def log(*parts: Any) -> None:
    print(f"[multinode {time.strftime('%H:%M:%S')}]", *parts, flush=True)


# --------------------------------------------------------------------------- the loopback S3 server
class UploadHold:
    """WSGI middleware for the loopback S3 server: holds the first PUT whose path matches the
    armed pattern and that comes from a Ray worker on a node other than ``spare`` (the head,
    which cannot be removed). Its body is read, then the request waits for `release`; if the
    sending process is gone by then, the request is dropped (never stored) and `info` says so."""

    def __init__(self, server_port: Callable[[], int], node_of_pid: Callable[[int], str | None]):
        self.server_port, self.node_of_pid = server_port, node_of_pid
        self.lock = threading.Lock()
        self.pattern: re.Pattern | None = None
        self.spare: str | None = None
        self.held, self.release = threading.Event(), threading.Event()
        self.info: dict[str, Any] = {}

    def arm(self, pattern: str, spare: str) -> None:
        with self.lock:
            self.pattern, self.spare, self.info = re.compile(pattern), spare, {}
            self.held.clear()
            self.release.clear()

    def disarm(self) -> None:
        with self.lock:
            self.pattern = None
        self.release.set()

    def _sender(self, port: int) -> tuple[int | None, str | None]:
        import psutil

        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.raddr and c.raddr.port == self.server_port() and c.pid:
                return c.pid, self.node_of_pid(c.pid)
        return None, None

    def _holders(self, port: int) -> list:
        import psutil

        out = []
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.raddr and c.raddr.port == self.server_port():
                try:
                    p = psutil.Process(c.pid)
                    out.append([c.pid, p.status(), " ".join(p.cmdline())[:80], c.status])
                except Exception as e:  # noqa: BLE001
                    out.append([c.pid, repr(e), c.status])
        return out

    def __call__(self, app):
        def middleware(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if environ["REQUEST_METHOD"] != "PUT" or "HTTP_X_AMZ_COPY_SOURCE" in environ:
                return app(environ, start_response)
            with self.lock:
                claim = self.pattern is not None and self.pattern.search(path) is not None
                if claim:
                    pid, node = self._sender(int(environ["REMOTE_PORT"]))
                    claim = node is not None and node != self.spare
                    if claim:
                        self.pattern = None  # one hold per arming
            if not claim:
                return app(environ, start_response)
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length)
            self.info.update(path=path, pid=pid, node=node, bytes=len(body), length=length)
            self.held.set()
            self.release.wait(WAIT_S)
            sock = environ.get("werkzeug.socket")
            deadline = time.monotonic() + 10.0  # the sender is dead by now: its FIN is on the way
            while True:
                try:  # a closed connection reads as b"" (or resets); a live one has nothing to read
                    gone = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            self.info.update(sender_gone=gone, stored=not gone,
                             holders=self._holders(int(environ["REMOTE_PORT"])))
            if gone:
                start_response("500 Internal Server Error", [("Content-Length", "0")])
                return [b""]
            environ["wsgi.input"] = io.BytesIO(body)
            return app(environ, start_response)

        return middleware


def start_s3(hold: UploadHold) -> tuple[Any, int]:
    from moto.server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class Server(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = hold(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = Server(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server, server.get_host_and_port()[1]


# --------------------------------------------------------------------------- reading results
def s3fs():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def digest(b: bytes) -> str:
    return hashlib.sha1(b).hexdigest()


def jsonable(rows: list[dict]) -> list[dict]:
    """Rows with bytes as their sha1 and floats as repr (exact comparison after JSON)."""
    out = []
    for r in rows:
        out.append({k: (digest(v) if isinstance(v, bytes) else repr(v) if isinstance(v, float) else v)
                    for k, v in r.items()})
    return out


def listing(prefix: str) -> dict[str, list[str]]:
    """Every object under ``prefix``: ``visible`` (what readers list) and ``hidden`` (names that
    start with "." or "_", which readers skip)."""
    fs = s3fs()
    keys = sorted(p[len(prefix.removeprefix("s3://")) + 1:] for p in fs.find(prefix.removeprefix("s3://")))
    hidden = [k for k in keys if any(part.startswith((".", "_")) for part in k.split("/"))]
    return {"visible": [k for k in keys if k not in hidden], "hidden": hidden}


def ingest_facts(data: str) -> dict:
    from pipelines import storage
    from pipelines.ingest import read_clips, read_quarantine

    storage.fs_and_path(data)[0].invalidate_cache()  # a new process's view (see latents_facts)
    done = {}
    for name in sorted(storage.list_names(storage.join(data, "_done"))):
        s = storage.read_json(storage.join(data, "_done", name))
        done[s["source"]] = s.get("node")
    clips = sorted(read_clips(data).to_pylist(), key=lambda r: r["clip_id"])
    quarantine = sorted(read_quarantine(data).to_pylist(), key=lambda r: (r["source"], str(r["clip_id"])))
    return {"clips": jsonable(clips), "quarantine": jsonable(quarantine), "node_of_source": done,
            "files": listing(data)}


def latents_facts(data: str, ray_data: bool = True) -> dict:
    """The latents' rows and files; with ``ray_data``, also how many rows Ray Data reads (as
    training does: a partial file would add rows)."""
    import ray

    from pipelines import storage, trainer
    from pipelines.latents import read_latents

    # what a new process (training), which starts with no cached listing, reads: this process's
    # s3fs instance keeps the listings it made (encode's driver listed latents/ before its
    # workers wrote there, and `storage.read_table` asks `exists` first), so they are dropped
    storage.fs_and_path(data)[0].invalidate_cache()
    rows = sorted(read_latents(data).to_pylist(), key=lambda r: r["clip_id"])
    out = {"rows": jsonable(rows), "files": listing(storage.join(data, "latents"))}
    if ray_data:
        fs, path = trainer.pyarrow_fs(storage.join(data, "latents"))  # as training reads them
        out["ray_data_rows"] = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"]).count()
    return out


def bulk_facts(out: str) -> dict:
    from pipelines import storage
    from pipelines.generate_bulk import read_manifest

    storage.fs_and_path(out)[0].invalidate_cache()  # a new process's view (see latents_facts)
    fs = s3fs()
    rows = []
    for r in read_manifest(out).to_pylist():
        video = None
        if r["path"]:
            with fs.open(r["path"], "rb") as f:
                video = digest(f.read())
        rows.append({**{k: v for k, v in r.items() if k not in ("seconds", "path")},
                     "file": r["path"].rsplit("/", 1)[-1] if r["path"] else None, "video_sha1": video})
    return {"manifest": jsonable(sorted(rows, key=lambda r: r["id"])), "files": listing(out)}


# --------------------------------------------------------------------------- the cluster
class Nodes:
    """The Cluster, and which node a process runs on (its raylet is an ancestor)."""

    def __init__(self, temp_dir: str):
        from ray.cluster_utils import Cluster

        args = dict(include_dashboard=False, object_store_memory=150 * 1024**2)
        # no log monitor (it forwards workers' output to drivers, and ours do not print it; the
        # worker nodes run none either: one per machine)
        self.cluster = Cluster(initialize_head=True,
                               head_node_args=dict(num_cpus=2, temp_dir=temp_dir, _system_config=HEALTH_CHECKS,
                                                   include_log_monitor=False, **args))
        self.args = args
        self.head = self.cluster.head_node.node_id
        for _ in range(2):
            self.add()

    def add(self):
        return self.cluster.add_node(num_cpus=1, **self.args)

    def workers(self) -> list:
        return list(self.cluster.worker_nodes)

    def by_id(self, node_id: str):
        return next(n for n in self.cluster.list_all_nodes() if n.node_id == node_id)

    def node_of_pid(self, pid: int) -> str | None:
        import psutil

        from ray._private import ray_constants

        raylets = {}
        for n in self.cluster.list_all_nodes():
            procs = n.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET) or []
            if procs:
                raylets[procs[0].process.pid] = n.node_id
        try:
            p = psutil.Process(pid)
            while p is not None:
                if p.pid in raylets:
                    return raylets[p.pid]
                p = p.parent()
        except psutil.NoSuchProcess:
            return None
        return None

    def kill(self, node_id: str) -> None:
        """Lose a worker node: its raylet and every Ray process of it killed at once."""
        self.cluster.remove_node(self.by_id(node_id), allow_graceful=False)


def alive_nodes() -> list[str]:
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


def idle_cluster(n: int = 3) -> list[str]:
    """Wait until ``n`` nodes are alive and every CPU of them is free (the last stage's actors
    gone), so the next stage's actors and tasks spread one per node (Ray Data's "SPREAD")."""
    import ray

    def idle():
        nodes = alive_nodes()
        total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
        return nodes if len(nodes) == n and free >= total else None

    return wait_for(f"{n} idle nodes", idle)


def cluster_state() -> dict:
    """What a failed run leaves to read: nodes, free resources, live actors and where they are."""
    import ray

    actors = [{"class": a["ActorClassName"], "state": a["State"], "node": a["Address"]["NodeID"][:8],
               "pid": a["Pid"]} for a in ray._private.state.actors().values() if a["State"] != "DEAD"]
    return {"nodes": alive_nodes(), "total": ray.cluster_resources(), "free": ray.available_resources(),
            "actors": actors}


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(every)


class Background:
    """A run in a thread: its result or its error."""

    def __init__(self, fn: Callable[[], Any]):
        self.result, self.error = None, None

        def run():
            try:
                self.result = fn()
            except BaseException as e:  # noqa: BLE001 - reported to the main thread
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = WAIT_S) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError("the run did not finish")
        if self.error is not None:
            raise self.error
        return self.result


def lose_node_at_held_upload(nodes: Nodes, hold: UploadHold, pattern: str, run: Background,
                             at_hold: Callable[[], Any] | None = None) -> dict:
    """Arm the hold, wait until an upload from a worker node is held, kill that node, wait until
    the sender is gone, let the upload go. Returns what happened (and, under "at_hold", what
    ``at_hold()`` returned while the upload was held, before the kill)."""
    import psutil

    hold.arm(pattern, spare=nodes.head)
    wait_for("a held upload", lambda: hold.held.is_set() or not run.thread.is_alive())
    if not hold.held.is_set():
        hold.disarm()
        run.join()
        raise RuntimeError(f"the run ended before any upload matched {pattern}")
    seen = {"at_hold": at_hold()} if at_hold is not None else {}
    node, pid = hold.info["node"], hold.info["pid"]
    t0 = time.monotonic()
    nodes.kill(node)
    wait_for("the sender's exit", lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
    hold.release.set()
    wait_for("the held request's end", lambda: "sender_gone" in hold.info)
    return {**hold.info, **seen, "kill_seconds": round(time.monotonic() - t0, 2)}


# --------------------------------------------------------------------------- scenarios
def scenario_stages(nodes: Nodes, hold: UploadHold, res: dict, inputs: dict) -> None:
    from pipelines.caption import CaptionConfig, run_caption
    from pipelines.encode import EncodeConfig, run_encode
    from pipelines.generate_bulk import BulkConfig, run_generate_bulk
    from pipelines.ingest import run_ingest
    from pipelines.ingest_config import IngestConfig

    icfg = IngestConfig(min_motion=0.0)
    ecfg = EncodeConfig(vae=inputs["vae"], actors=3, batch_size=1, torch_threads=1, dtype="float32")
    bcfg = BulkConfig(size="32x32", frames=5, steps=1, batch_size=1, actors=3, torch_threads=1)
    timing = res["seconds"]

    # 1. clean runs on every node
    t = time.monotonic()
    res["ingest"] = {"clean": {"nodes": idle_cluster()}}
    res["ingest"]["clean"]["summary"] = run_ingest([inputs["raw"]], f"{S3}/clean", icfg)
    res["ingest"]["clean"].update(ingest_facts(f"{S3}/clean"))
    run_caption(f"{S3}/clean", CaptionConfig(model=None))
    timing["ingest_clean"] = time.monotonic() - t
    t = time.monotonic()
    res["encode"] = {"clean": {"nodes": idle_cluster()}}
    res["encode"]["clean"]["summary"] = run_encode(f"{S3}/clean", ecfg)
    res["encode"]["clean"].update(latents_facts(f"{S3}/clean", ray_data=False))  # the faulted run's is compared
    timing["encode_clean"] = time.monotonic() - t
    t = time.monotonic()
    res["bulk"] = {"clean": {"nodes": idle_cluster()}}
    res["bulk"]["clean"]["summary"] = run_generate_bulk(inputs["model"], inputs["prompts"], f"{S3}/bulk-clean", bcfg)
    res["bulk"]["clean"].update(bulk_facts(f"{S3}/bulk-clean"))
    timing["bulk_clean"] = time.monotonic() - t
    log("clean runs done", {k: round(v, 1) for k, v in timing.items()})

    # 2. each stage loses the worker node that is writing one of its output files
    def faulted(stage: str, fn: Callable[[], Any], pattern: str) -> dict:
        t = time.monotonic()
        before = idle_cluster()
        run = Background(fn)
        lost = lose_node_at_held_upload(nodes, hold, pattern, run)
        summary = run.join()
        rec = {"summary": summary, "lost": lost, "nodes_before": before, "nodes_after": alive_nodes()}
        timing[f"{stage}_faulted"] = time.monotonic() - t
        log(f"{stage}: lost node {lost['node'][:8]} while it wrote {lost['path']}; run done in "
            f"{timing[f'{stage}_faulted']:.1f} s")
        t = time.monotonic()
        nodes.add()  # a fresh node for the next scenario
        timing[f"{stage}_node_added"] = time.monotonic() - t
        return rec

    res["ingest"]["faulted"] = faulted("ingest", lambda: run_ingest([inputs["raw"]], f"{S3}/faulted", icfg),
                                       rf"^/{BUCKET}/faulted/clips/\.[^/]+\.tmp-")
    res["ingest"]["faulted"].update(ingest_facts(f"{S3}/faulted"))
    run_caption(f"{S3}/faulted", CaptionConfig(model=None))
    res["encode"]["faulted"] = faulted("encode", lambda: run_encode(f"{S3}/faulted", ecfg),
                                       rf"^/{BUCKET}/faulted/latents/\.[^/]+\.tmp-")
    res["encode"]["faulted"].update(latents_facts(f"{S3}/faulted"))
    res["bulk"]["faulted"] = faulted("bulk", lambda: run_generate_bulk(inputs["model"], inputs["prompts"],
                                                                       f"{S3}/bulk-faulted", bcfg),
                                     rf"^/{BUCKET}/bulk-faulted/videos/\.[^/]+\.mp4\.tmp-")
    res["bulk"]["faulted"].update(bulk_facts(f"{S3}/bulk-faulted"))
    res["bulk"]["rerun"] = run_generate_bulk(inputs["model"], inputs["prompts"], f"{S3}/bulk-faulted", bcfg)

    # 3. a job that stops right after losing a node, then the same job again
    class Stop(Exception):
        pass

    stop = threading.Event()
    seen_after_stop: list[str] = []

    def stop_after_loss(summary: dict, done: int, total: int) -> None:
        # from the moment a worker node's upload is held (the node about to go): a job stopped
        # later would find every source submitted already (Ray finishes the tasks on their way)
        if stop.is_set() or hold.held.is_set():
            seen_after_stop.append(summary["source"])
            raise Stop("the job stops")

    # two workers (four tasks at once): with one per CPU of the cluster all eight sources would be
    # on their way before the loss, and nothing left to re-run
    scfg = IngestConfig(min_motion=0.0, actors=2)
    t = time.monotonic()
    sources = len(res["ingest"]["clean"]["node_of_source"])
    # The stop reaches the job with the first row after the loss; on a loaded machine that row can
    # come after the last blocks were handed out and every source finished, which leaves nothing
    # for the re-run to show. Such a try proves nothing either way: try again on a fresh prefix.
    for attempt in range(1, 4):
        data = f"{S3}/stopped" if attempt == 1 else f"{S3}/stopped-{attempt}"
        idle_cluster()
        stop.clear()
        hold.held.clear()  # the last scenario's held upload is not this one's
        run = Background(lambda data=data: run_ingest([inputs["raw"]], data, scfg, progress=stop_after_loss))
        lost = lose_node_at_held_upload(nodes, hold, rf"^/{BUCKET}/{data.split('/')[-1]}/clips/\.[^/]+\.tmp-", run)
        stop.set()
        try:
            run.join()
            stopped = False
        except Stop:
            stopped = True
        left = listing(data)
        nodes.add()
        if sum(k.startswith("_done/") for k in left["hidden"]) < sources:
            break
        log(f"ingest stopped: every source had finished by the stop (try {attempt}); again")
    rerun = run_ingest([inputs["raw"]], data, icfg)
    res["ingest"]["stopped"] = {"lost": lost, "stopped": stopped, "left": left, "rerun": rerun, "tries": attempt}
    res["ingest"]["stopped"].update(ingest_facts(data))
    timing["ingest_stopped_and_rerun"] = time.monotonic() - t


_POLL_FS: list = []


def registered_checkpoint(run_dir: str) -> tuple[int, str | None]:
    """The step and directory name of the latest checkpoint Ray Train has registered (its manager
    snapshot). One filesystem for every poll (a new one builds a new S3 client, costly at a few
    polls a second), its cached listings dropped before each read."""
    if not _POLL_FS:
        _POLL_FS.append(s3fs())
    fs = _POLL_FS[0]
    path = f"{run_dir.removeprefix('s3://')}/checkpoint_manager_snapshot.json"
    fs.invalidate_cache(path)
    try:
        with fs.open(path, "rb") as f:
            latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not there yet, or being rewritten
        return -1, None
    return int(latest.get("metrics", {}).get("checkpoint_step", -1)), latest.get("checkpoint_dir_name")


def committed_step(run_dir: str) -> int:
    return registered_checkpoint(run_dir)[0]


def registered_before(run_dir: str, held_path: str) -> int:
    """The step of the checkpoint written last before the one whose upload is held (at
    ``held_path``), once Ray Train has registered it: its uploads ended, the workers went on, so
    the controller registers it while the held one cannot be (a checkpoint directory's name is its
    creation time)."""
    held = re.search(r"/(checkpoint_[^/]+)/", held_path).group(1)
    names = [d.rsplit("/", 1)[-1] for d in s3fs().ls(run_dir.removeprefix("s3://"), detail=False)]
    last = max(n for n in names if n.startswith("checkpoint_") and not n.endswith(".json") and n < held)

    def registered():
        step, name = registered_checkpoint(run_dir)
        return step if name == last else None

    return wait_for(f"{last} registered", registered)


def train_workers() -> dict[int, str]:
    """Ray Train worker processes alive now: pid -> node id (Ray's actor table)."""
    import ray

    return {int(a["Pid"]): a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE" and a["Pid"]}


def training_data(workdir: str, res: dict, inputs: dict) -> tuple[str, str]:
    """(DATA, VAE) to train on: the clean run's latents when part "stages" made them, else a
    small latents table written here and put on S3."""
    if "encode" in res:
        return f"{S3}/clean", inputs["vae"]
    from test_train import build_latents

    data, vae = build_latents(os.path.join(workdir, "train-latents"), n=12)
    s3fs().put(os.path.join(data, "latents") + "/", f"{BUCKET}/train-data/latents/", recursive=True)
    return f"{S3}/train-data", vae


def scenario_training(nodes: Nodes, hold: UploadHold, res: dict, inputs: dict, workdir: str) -> None:
    """DiT training, one worker per node; once a checkpoint is registered, the next one's upload
    from a worker node is held and that node killed: the checkpoint being written can never be
    registered, so the group that Ray Train restarts on the nodes left resumes from the last
    one, and the run goes on to its last step."""
    from pipelines.train import TrainConfig, inspect_latents, run_training

    t = time.monotonic()
    data, vae = training_data(workdir, res, inputs)
    info = inspect_latents(data)
    # 8 steps, a checkpoint every 2: after the first registered one, three more uploads to hold
    # one of (steps go fast: each worker keeps its samples after the first epoch)
    cfg = TrainConfig(preset="tiny", workers=3, cpus_per_worker=0.75, placement="spread", max_steps=8,
                      tokens_per_step=info["max_tokens"], lr=1e-3, warmup_steps=1, checkpoint_every_steps=2,
                      checkpoint_every_minutes=None, log_every_steps=1, shuffle_buffer_rows=0, max_failures=2,
                      keep_checkpoints=8, seed=0)
    store, name = f"{S3}/train", "dit"
    before = idle_cluster()
    res["seconds"]["train_setup"] = time.monotonic() - t
    run = Background(lambda: run_training(data, os.path.join(workdir, "model"), vae, cfg, storage_path=store,
                                          name=name))

    def running(what: str, check: Callable[[], Any]) -> Any:
        def go():
            if not run.thread.is_alive():
                run.join()
                raise RuntimeError(f"training ended before {what}")
            return check()
        return wait_for(what, go, every=0.5)  # each check asks the GCS for every actor, or S3

    first = running("three training workers", lambda: w if len(w := train_workers()) == 3 else None)
    running("a registered checkpoint", lambda: committed_step(f"{store}/{name}") >= 2)
    res["seconds"]["train_first_checkpoint"] = time.monotonic() - t
    # the last checkpoint registered before the held one (the workers may have passed more
    # checkpoints since the first was seen): the one the restarted group must resume from
    lost = lose_node_at_held_upload(nodes, hold, rf"^/{BUCKET}/train/{name}/checkpoint_[^/]+/", run,
                                    at_hold=lambda: registered_before(f"{store}/{name}", hold.info["path"]))
    step = lost.pop("at_hold")
    at_loss = committed_step(f"{store}/{name}")  # the held checkpoint's upload never completed
    second = running("the restarted workers",
                     lambda: w if len(w := train_workers()) == 3 and not set(w) & set(first) else None)
    res["seconds"]["train_restarted"] = time.monotonic() - t
    summary = run.join()
    fs = s3fs()
    ckpts = {}
    for d in sorted(fs.ls(f"{BUCKET}/train/{name}", detail=False)):
        if d.rsplit("/", 1)[-1].startswith("checkpoint_"):
            ckpts[d.rsplit("/", 1)[-1]] = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(d, detail=False))
    res["train"] = {"nodes_before": before, "first_workers": first, "lost": lost, "committed_before_loss": step,
                    "committed_at_loss": at_loss,
                    "second_workers": second, "nodes_after": alive_nodes(), "checkpoints": ckpts,
                    "summary": {k: summary[k] for k in ("steps", "resumed_from", "final_loss", "checkpoint")},
                    "losses": summary["history"], "max_steps": cfg.max_steps, "every": cfg.checkpoint_every_steps}
    res["seconds"]["train"] = time.monotonic() - t
    log(f"training: lost {lost['node'][:8]} while it wrote {lost['path']} (checkpoint {step} registered); "
        f"resumed from {summary['resumed_from']} in {res['seconds']['train']:.1f} s")


# --------------------------------------------------------------------------- set-up
def make_inputs(workdir: str) -> dict:
    import numpy as np  # noqa: F401 - torch and numpy load before the cluster starts
    import torch

    from sora.shapes import TINY, synth_dataset
    from sora.vae import CausalVideoVAE, VAEConfig
    from tiny_model import build_tiny_model

    raw = os.path.join(workdir, "raw")
    synth_dataset(raw, 8, seed=5, ranges=TINY)
    fs = s3fs()
    fs.mkdir(BUCKET)
    fs.put(raw + "/", f"{BUCKET}/raw/", recursive=True)
    torch.manual_seed(0)
    vae = os.path.join(workdir, "vae")
    CausalVideoVAE(VAEConfig.preset("tiny")).save_pretrained(vae)
    prompts = [{"id": f"p{i}", "prompt": f"a {c} square moves {m}", "seed": i}
               for i, (c, m) in enumerate([("red", "left"), ("green", "right"), ("blue", "up"), ("white", "down"),
                                           ("yellow", "left"), ("cyan", "right"), ("magenta", "up"), ("red", "down")])]
    with fs.open(f"{BUCKET}/prompts.jsonl", "w") as f:
        f.write("\n".join(json.dumps(p) for p in prompts) + "\n")
    return {"raw": f"{S3}/raw", "vae": vae, "model": build_tiny_model(os.path.join(workdir, "tiny-model")),
            "prompts": f"{S3}/prompts.jsonl"}


def main(workdir: str, result_path: str, parts: str = "stages,training") -> int:
    for k, v in dict(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
                     TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_TRAIN_ENABLE_PRINT_PATCH="0",
                     AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                     AWS_DEFAULT_REGION="us-east-1").items():
        os.environ.setdefault(k, v)
    sys.path.insert(0, HERE)
    res: dict[str, Any] = {"seconds": {}, "load_average_at_start": os.getloadavg()}
    t_all = time.monotonic()
    nodes: Nodes | None = None
    temp: str | None = None
    holder: dict[str, Nodes] = {}
    hold = UploadHold(lambda: port, lambda pid: holder["nodes"].node_of_pid(pid) if "nodes" in holder else None)
    server, port = start_s3(hold)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"  # the nodes started below inherit it
    try:
        t = time.monotonic()
        inputs = make_inputs(workdir)
        res["seconds"]["inputs"] = time.monotonic() - t
        import ray
        from ray.data import DataContext

        t = time.monotonic()
        short = os.path.join(os.path.dirname(HERE), ".tmp")  # Ray's socket paths must stay short
        os.makedirs(short, exist_ok=True)
        temp = tempfile.mkdtemp(prefix="r", dir=short)
        # Ray writes the address of a cluster it starts to RAY_TMPDIR/ray/ray_current_cluster
        # (/tmp/ray by default), where any other `ray.init()` on this machine - another test
        # run's command line, say - would find and join it: a private one keeps it ours.
        os.environ["RAY_TMPDIR"] = temp
        os.makedirs(os.path.join(temp, "ray"))
        nodes = holder["nodes"] = Nodes(temp)
        ray.init(address=nodes.cluster.address, log_to_driver=False, configure_logging=False)
        DataContext.get_current().enable_progress_bars = False
        wait_for("three nodes", lambda: len(alive_nodes()) == 3)
        res["head"] = nodes.head
        res["seconds"]["cluster"] = time.monotonic() - t
        log(f"cluster up in {res['seconds']['cluster']:.1f} s: {ray.cluster_resources()}")
        if "stages" in parts.split(","):
            scenario_stages(nodes, hold, res, inputs)
        if "training" in parts.split(","):
            scenario_training(nodes, hold, res, inputs, workdir)
    except BaseException as e:  # noqa: BLE001 - the JSON says what failed; the test shows it
        res["error"] = "".join(traceback.format_exception(e))
        try:
            res["cluster_at_error"] = cluster_state()
        except Exception as e2:  # noqa: BLE001 - a diagnosis only
            res["cluster_at_error"] = repr(e2)
        log("failed:", res["error"])
    finally:
        res["seconds"]["total"] = time.monotonic() - t_all
        res["load_average_at_end"] = os.getloadavg()
        with open(result_path, "w") as f:
            json.dump(res, f, indent=1, default=str)
        hold.disarm()
        try:
            import ray

            ray.shutdown()
        finally:
            if nodes is not None:
                nodes.cluster.shutdown()
            if temp is not None and "error" in res and os.environ.get("MULTINODE_KEEP_LOGS"):
                log(f"Ray's logs kept in {temp}")
            elif temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
            server.stop()
    log(f"all done in {res['seconds']['total']:.1f} s")
    return 1 if "error" in res else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
