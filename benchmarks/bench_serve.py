"""Serving under load: N clients submit at once and poll, `sora serve` vs a naive synchronous endpoint.

    python -m benchmarks.bench_serve [--quick] [--clients N] [--steps S] [--repeats R] [--direct-ingress]
                                     [--ingress-port] [--ingress-nice N|none]

Both run on one local Ray (2 CPUs) behind Serve's HTTP proxy, with the same tiny random model,
the same request (32x32, 9 frames, S steps) and the same autoscaling (1..2 generator replicas of
half a CPU each, one intra-op thread):

- baseline: a naive endpoint that generates the video inside the request (one request at a time
  per replica, the others wait in Serve's proxy) and answers when the mp4 is written - what a
  first HTTP wrapper around a pipeline usually is;
- ours: `pipelines.serve`, which answers with a queued job and generates same-shape jobs in
  packed batches; its clients poll GET /v1/videos/{id} as the `openai-poll-after-ms` header says
  (what the openai client's `videos.poll` does) until the job is final.

Each client has its own keep-alive connection, opened before the burst; then all N send their
POST at once. Submission latency is the time from a client writing its POST to reading the
answer (for the baseline that is also when the video exists: it has no other way to answer); a
429 is an answer too, counted, and the client retries after its Retry-After. A job is lost when
it was accepted (200 with an id) and is neither "completed" nor "failed" within the deadline, or
when a request got no answer. Replicas added / time to add: the generator replicas, sampled from
`serve.status()` every 0.2 s, against the count before the burst: when the autoscaler asked for
one more, when it was RUNNING (a replica starts a Ray worker and loads the model), and how many
more ran at peak. Throughput is N / the time until every job is final. As context, the same
burst is sent to a no-op Serve endpoint (FastAPI, answers at once): the latency floor of Serve's
proxy on this machine. Runs are interleaved (naive, ours, naive, ours ...) with the replicas
back at the minimum before each, and the figures are medians over the repeats, so drifting load
on a shared machine hits both.

--direct-ingress runs the same with Ray Serve's throughput-optimized mode
(RAY_SERVE_THROUGHPUT_OPTIMIZED=1, set before Ray starts): each app's ingress replica answers
HTTP on a port of its own, with no proxy hop (the clients are pointed at that port).

--ingress-port points ours' clients at the port its ingress replica serves itself
(`ServeConfig.http_port`: uvicorn with httptools inside the replica, on its event loop, no Serve
hop); the naive endpoint stays on Serve's path (proxy, or direct ingress with both flags), and
a no-op FastAPI app served the same way (uvicorn in a Serve replica) is the floor beside it.

The client is a few lines of asyncio over raw HTTP/1.1 on purpose: a full client library costs
about a millisecond of CPU per request, and 200 of them from one process would time the client.
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from benchmarks.common import report  # noqa: E402

FINAL = ("completed", "failed")
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 2,
               "upscale_delay_s": 1.0, "downscale_delay_s": 3.0, "metrics_interval_s": 0.5,
               "look_back_period_s": 2.0}
REPLICA_CPUS = 0.5

naive_api = FastAPI()


@serve.deployment(name="NaiveSync", max_ongoing_requests=1)
@serve.ingress(naive_api)
class NaiveSync:
    """The baseline: generate in the request handler, answer when the video is written."""

    def __init__(self, model: str, out: str, threads: int):
        import torch

        from sora.pipeline import SoraPipeline

        torch.set_num_threads(threads)
        self.pipe, self.out, self.n = SoraPipeline.from_pretrained(model), out, 0

    @naive_api.post("/v1/videos")
    async def create(self, request: Request):
        body = await request.json()
        return JSONResponse(await asyncio.to_thread(self._generate, body))

    def _generate(self, body: dict) -> dict:
        from sora.video_io import write_video

        out = self.pipe(body["prompt"], num_inference_steps=int(body["num_inference_steps"]),
                        generator=int(body["seed"]))
        self.n += 1
        name = f"{os.getpid()}-{self.n}"
        write_video(os.path.join(self.out, f"{name}.mp4"), out.frames, out.fps)
        return {"id": name, "status": "completed"}


noop_api = FastAPI()


@serve.deployment(name="Noop", max_ongoing_requests=1024)
@serve.ingress(noop_api)
class Noop:
    """Context: Serve's own cost per request (proxy, replica, FastAPI), nothing else."""

    @noop_api.post("/v1/videos")
    async def create(self, request: Request):
        return JSONResponse({"id": "noop", "status": "completed", "bytes": len(await request.body())})


@serve.deployment(name="NoopOwnPort", ray_actor_options={"num_cpus": 0})
class NoopOwnPort:
    """Context for --ingress-port: the no-op app on uvicorn inside a Serve replica, as ours runs
    (at the niceness ours asks for, `ServeConfig.ingress_nice`)."""

    async def __init__(self, port: int, nice: int | None):
        from pipelines.serve import set_thread_nice
        from pipelines.serve_fastpath import start_http_server

        set_thread_nice(nice)
        self.server = start_http_server(noop_api, "127.0.0.1", port)


class Conn:
    """One client's keep-alive HTTP/1.1 connection (requests one at a time)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str | None):
        self.reader, self.writer = reader, writer
        self.auth = f"Authorization: Bearer {key}\r\n" if key else ""

    @classmethod
    async def open(cls, port: int, key: str | None) -> "Conn":
        return cls(*await asyncio.open_connection("127.0.0.1", port), key)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{self.auth}Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            return status, headers, await self.reader.readexactly(int(headers["content-length"]))
        data = b""  # chunked
        while size := int((await self.reader.readline()).strip(), 16):
            data += (await self.reader.readexactly(size + 2))[:-2]
        await self.reader.readline()
        return status, headers, data

    def close(self) -> None:
        self.writer.close()


async def burst(port: int, prefix: str, key: str | None, n: int, steps: int, poll: bool,
                deadline_s: float) -> dict:
    """N clients POST at once (retrying 429s after Retry-After), then poll their job until final."""
    conns = await asyncio.gather(*[Conn.open(port, key) for _ in range(n)])
    start = asyncio.Event()
    latency: list[float] = []
    outcome: dict[int, str] = {}
    rejected = 0
    t0 = 0.0

    async def client(i: int) -> None:
        nonlocal rejected
        c = conns[i]
        body = json.dumps({"prompt": f"a red circle moves left, take {i}", "seed": i, "num_inference_steps": steps,
                           "seconds": 1}).encode()
        await start.wait()
        try:
            while True:
                t = time.perf_counter()
                status, headers, data = await c.request("POST", prefix + "/v1/videos", body)
                latency.append(time.perf_counter() - t)  # every answer, a 429 too
                if status != 429:
                    break
                rejected += 1
                await asyncio.sleep(float(headers.get("retry-after", "1")))
            if status != 200:
                outcome[i] = f"http {status}"
                return
            job = json.loads(data)
            while poll and job["status"] not in FINAL and time.perf_counter() - t0 < deadline_s:
                await asyncio.sleep(float(headers.get("openai-poll-after-ms", "1000")) / 1000)
                status, headers, data = await c.request("GET", f"{prefix}/v1/videos/{job['id']}")
                if status != 200:
                    break
                job = json.loads(data)
            outcome[i] = job["status"] if status == 200 else f"http {status}"
        except (OSError, ValueError, asyncio.IncompleteReadError) as e:
            outcome[i] = type(e).__name__
        finally:
            outcome.setdefault(i, "unanswered")

    tasks = [asyncio.ensure_future(client(i)) for i in range(n)]
    await asyncio.sleep(0)  # every client waits at the start line
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    span = time.perf_counter() - t0
    for c in conns:
        c.close()
    states = list(outcome.values())
    return {"latency": latency, "span": span, "rejected_429": rejected, "completed": states.count("completed"),
            "failed": states.count("failed"), "lost": sum(s not in FINAL for s in states)}


class ReplicaWatch:
    """Replicas of one deployment over time (a thread sampling `serve.status()`): the ones the
    autoscaler asked for (any state but STOPPING) and the RUNNING ones."""

    def __init__(self, app: str, deployment: str, every_s: float = 0.2):
        self.app, self.deployment, self.every_s = app, deployment, every_s
        self.samples: list[tuple[float, int, int]] = []  # (time, asked for, running)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def counts(self) -> tuple[int, int]:
        states = serve.status().applications[self.app].deployments[self.deployment].replica_states
        return sum(n for s, n in states.items() if s != "STOPPING"), states.get("RUNNING", 0)

    def running(self) -> int:
        return self.counts()[1]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), *self.counts()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "ReplicaWatch":
        self.t0 = time.perf_counter()
        self.before = self.running()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """Replicas added (RUNNING, peak - before) and the seconds from the burst until the
        autoscaler asked for one more, and until it was running (None: not within the run)."""
        peak = max([r for _, _, r in self.samples] + [self.before])
        asked = next((t - self.t0 for t, a, _ in self.samples if a > self.before), None)
        running = next((t - self.t0 for t, _, r in self.samples if r > self.before), None)
        return {"replicas_added": peak - self.before, "replica_asked_after_s": asked,
                "replica_running_after_s": running}

    def wait_for(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.running() != count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.app}: replicas did not return to {count}")
            time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_port(app: str, proxy_port: int, direct: bool, timeout: float = 120.0) -> int:
    """The port that serves ``app``: Serve's proxy, or with direct ingress its ingress replica's own."""
    if not direct:
        return proxy_port
    import ray

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        groups = ray.get(controller.get_target_groups.remote(app_name=app))
        ports = {t.port for g in groups if g.protocol == "HTTP" for t in g.targets} - {proxy_port}
        if ports:
            return min(ports)
        time.sleep(0.5)
    raise RuntimeError(f"no direct ingress port for {app}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="50 clients, 1 repeat")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients per run (default 200)")
    ap.add_argument("--steps", type=int, default=2, help="sampling steps per video")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each (default 3; medians reported)")
    ap.add_argument("--max-queue", type=int, default=None,
                    help="ours: unfinished jobs before 429 (default: the number of clients, so all are accepted)")
    ap.add_argument("--direct-ingress", action="store_true",
                    help="Serve's throughput-optimized mode: ingress replicas answer HTTP themselves, no proxy")
    ap.add_argument("--ingress-port", action="store_true",
                    help="ours: clients go to the port its ingress replica serves itself (http_port), no Serve hop")
    ap.add_argument("--ingress-nice", default=None,
                    help="ours: the ingress's niceness (ServeConfig.ingress_nice; default its default, 0; 'none': "
                         "as Ray starts workers, 15); the own-port no-op floor follows it")
    args = ap.parse_args()
    if args.direct_ingress:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    n = args.clients or (50 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 3)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from pipelines.ray_utils import wait_for_serve_proxy
    from pipelines.serve import build_app, dispatch_limit
    from pipelines.serve_config import ServeConfig
    from tiny_model import build_tiny_model

    work = tempfile.mkdtemp(prefix="bench-serve-")
    model = build_tiny_model(os.path.join(work, "model"))
    os.makedirs(os.path.join(work, "naive"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    key = "bench-key"
    deadline_s = 120 + n * args.steps
    ours_cfg = {"model": model, "storage": os.path.join(work, "store"), "api_key": key,
                "num_cpus": REPLICA_CPUS, "num_gpus": 0, "torch_threads": 1,
                "max_queue": args.max_queue or n, "max_batch_size": 8, "batch_wait_timeout_s": 0.05,
                "heartbeat_s": 1.0, "stale_after_s": 60,
                **{k: v for k, v in AUTOSCALING.items() if k != "initial_replicas"}}
    if args.ingress_nice is not None:
        ours_cfg["ingress_nice"] = args.ingress_nice  # a string: ServeConfig reads it as it reads `serve run` args
    ours_nice = ServeConfig.from_args(ours_cfg).ingress_nice
    own = {"sora": free_port(), "noop-own": free_port()} if args.ingress_port else {}
    if own:
        ours_cfg["http_port"] = own["sora"]
    runs: dict[str, list[dict]] = {"naive": [], "ours": [], "noop": [], "noop-own": []}
    loads = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ours_cfg), name="sora", route_prefix="/", blocking=False)
        serve.run(NaiveSync.options(autoscaling_config=AUTOSCALING, ray_actor_options={"num_cpus": REPLICA_CPUS})
                  .bind(model, os.path.join(work, "naive"), 1), name="naive", route_prefix="/naive", blocking=False)
        serve.run(Noop.options(ray_actor_options={"num_cpus": 0}).bind(), name="noop", route_prefix="/noop",
                  blocking=False)
        if own:
            serve.run(NoopOwnPort.bind(own["noop-own"], ours_nice), name="noop-own", route_prefix=None,
                      blocking=False)
        sides = {"naive": ("naive", "/naive", None, False, "NaiveSync"),
                 "ours": ("sora", "", key, True, "VideoGenerator")}
        ports = {app: app_port(app, port, args.direct_ingress) for app in ("naive", "sora", "noop")}
        ports.update(own)
        for p in own.values():
            wait_for_serve_proxy("127.0.0.1", p, 300)  # listening

        def run(side: str, warm: bool = False) -> None:
            app, prefix, k, poll, deployment = sides[side]
            ReplicaWatch(app, deployment).wait_for(AUTOSCALING["min_replicas"])
            loads.append(os.getloadavg()[0])
            with ReplicaWatch(app, deployment) as watch:
                result = asyncio.run(burst(ports[app], prefix, k, n, args.steps, poll, deadline_s))
            result.update(watch.summary())
            if not warm:
                runs[side].append(result)
            print(json.dumps({"side": side, "warm-up": warm, **{k: v for k, v in result.items() if k != "latency"},
                              "p99_s": round(float(np.percentile(result["latency"], 99)), 4)}), file=sys.stderr)

        run("naive", warm=True)  # first generations, first encodes, the autoscaler's first decisions
        run("ours", warm=True)
        for _ in range(repeats):
            run("naive")
            run("ours")
            runs["noop"].append(asyncio.run(burst(ports["noop"], "/noop", None, n, args.steps, False, deadline_s)))
            if own:
                runs["noop-own"].append(asyncio.run(burst(ports["noop-own"], "", None, n, args.steps, False,
                                                          deadline_s)))
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    def med(side: str, fn) -> float:
        values = [fn(r) for r in runs[side]]
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else float("nan")

    pct = {q: {side: med(side, lambda r, q=q: float(np.percentile(r["latency"], q))) for side in runs if runs[side]}
           for q in (50, 99)}
    counts = {side: {k: [r[k] for r in runs[side]] for k in ("lost", "rejected_429", "completed", "failed",
                                                             "replicas_added", "replica_asked_after_s",
                                                             "replica_running_after_s")}
              for side in ("naive", "ours")}
    for side in runs:  # every run's own figures: the spread behind each median
        if runs[side]:
            counts.setdefault(side, {}).update({f"submission_p{q}_s": [round(float(np.percentile(r["latency"], q)), 4)
                                                                       for r in runs[side]] for q in (50, 99)})
    http = "direct ingress (no proxy)" if args.direct_ingress else "Serve's proxy"
    if own:
        http = f"ours: its ingress replica's own port (uvicorn); naive: {http}"
    extra = {"clients": n, "http": http, "ours_ingress_nice": ours_nice,
             "runs": repeats, "steps": args.steps, "size": "32x32x9",
             "autoscaling": {k: AUTOSCALING[k] for k in ("min_replicas", "max_replicas", "target_ongoing_requests",
                                                          "upscale_delay_s")},
             "cpus_per_replica": REPLICA_CPUS, "ours_max_queue": ours_cfg["max_queue"],
             "ours_dispatch_limit": dispatch_limit(ServeConfig.from_args(ours_cfg)),
             "per_run": counts, "load_avg_1m": [round(x, 2) for x in loads],
             "serve_noop_endpoint_p50_s": round(pct[50]["noop"], 4),
             "serve_noop_endpoint_p99_s": round(pct[99]["noop"], 4),
             **({"own_port_noop_endpoint_p50_s": round(pct[50]["noop-own"], 4),
                 "own_port_noop_endpoint_p99_s": round(pct[99]["noop-own"], 4)} if own else {})}
    names = ("naive sync endpoint: generates in the request, autoscaled 1..2 replicas",
             "sora serve: journaled job + @serve.batch, autoscaled 1..2 replicas")
    for q in (50, 99):
        report(f"serve_submission_latency_p{q}", "seconds", (names[0], pct[q]["naive"]), (names[1], pct[q]["ours"]),
               higher_is_better=False, unit="s", extra=extra)
    report("serve_jobs_lost", "jobs", (names[0], med("naive", lambda r: r["lost"])),
           (names[1], med("ours", lambda r: r["lost"])), higher_is_better=False, unit="jobs", extra=extra)
    report("serve_replica_asked_after", "seconds", (names[0], med("naive", lambda r: r["replica_asked_after_s"])),
           (names[1], med("ours", lambda r: r["replica_asked_after_s"])), higher_is_better=False, unit="s",
           extra=extra)
    report("serve_replica_running_after", "seconds", (names[0], med("naive", lambda r: r["replica_running_after_s"])),
           (names[1], med("ours", lambda r: r["replica_running_after_s"])), higher_is_better=False, unit="s",
           extra=extra)
    report("serve_throughput", "videos/s", (names[0], med("naive", lambda r: n / r["span"])),
           (names[1], med("ours", lambda r: n / r["span"])), higher_is_better=True, unit="videos/s", extra=extra)


if __name__ == "__main__":
    main()
