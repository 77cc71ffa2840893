"""Serving: submission latency and throughput of `sora serve` vs a naive synchronous endpoint.

    python -m benchmarks.bench_serve [--quick] [--requests N] [--steps S]

Both run on one local Ray (2 CPUs), the same tiny random model, the same request (32x32, 9
frames, S steps), one generator replica with 1 CPU each, and N concurrent POSTs on loopback:

- baseline: a naive endpoint that generates the video inside the request (one model, one
  request at a time, the others wait in Serve's proxy) and answers when the mp4 is written -
  what a first HTTP wrapper around a pipeline usually is;
- ours: `pipelines.serve` with min = max = 1 replica (no autoscaling: equal resources), which
  answers with a queued job at once and generates same-shape jobs in packed batches.

Submission latency is the time until the POST is answered (for the baseline that is also when
the video exists: it has no other way to answer). Throughput is N / the time until all N videos
exist (ours: polled through GET /v1/videos/{id}). With N requests, p99 is close to the maximum.
The two are interleaved (A B A B) so drifting load on a shared machine hits both.
"""

import argparse
import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from benchmarks.common import report  # noqa: E402

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
        path = os.path.join(self.out, f"{os.getpid()}-{self.n}.mp4")
        write_video(path, out.frames, out.fps)
        return {"status": "completed", "path": path}


async def submit_all(url: str, key: str | None, n: int, steps: int, poll: bool) -> tuple[list[float], float]:
    """N concurrent POSTs -> (per-request submission seconds, seconds until all videos exist)."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(headers=headers, timeout=600,
                                 limits=httpx.Limits(max_connections=n + 8)) as c:
        t0 = time.perf_counter()

        async def one(i: int) -> tuple[float, dict]:
            r = await c.post(url + "/v1/videos", json={"prompt": f"a red circle moves left, take {i}", "seed": i,
                                                      "num_inference_steps": steps})
            assert r.status_code == 200, r.text
            return time.perf_counter() - t0, r.json()

        results = await asyncio.gather(*[one(i) for i in range(n)])
        latencies = [s for s, _ in results]
        if poll:
            pending = {body["id"] for _, body in results}
            while pending:
                await asyncio.sleep(0.05)
                for vid in list(pending):
                    status = (await c.get(f"{url}/v1/videos/{vid}")).json()["status"]
                    assert status != "failed", vid
                    if status == "completed":
                        pending.discard(vid)
        return latencies, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    ap.add_argument("--requests", type=int, default=None, help="concurrent submissions per run (default 32)")
    ap.add_argument("--steps", type=int, default=8, help="sampling steps per video")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n = args.requests or (12 if args.quick else 32)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from pipelines.serve import build_app
    from tiny_model import build_tiny_model

    work = tempfile.mkdtemp(prefix="bench-serve-")
    model = build_tiny_model(os.path.join(work, "model"))
    os.makedirs(os.path.join(work, "naive"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "bench-key"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        ours_cfg = {"model": model, "storage": os.path.join(work, "store"), "api_key": key, "min_replicas": 1,
                    "max_replicas": 1, "num_cpus": 1, "torch_threads": 1, "max_queue": 4 * n, "max_batch_size": 8,
                    "batch_wait_timeout_s": 0.05, "heartbeat_s": 1.0, "stale_after_s": 60}
        serve.run(build_app(ours_cfg), name="sora", route_prefix="/", blocking=False)
        serve.run(NaiveSync.options(ray_actor_options={"num_cpus": 1}).bind(model, os.path.join(work, "naive"), 1),
                  name="naive", route_prefix="/naive", blocking=False)
        base = f"http://127.0.0.1:{port}"
        run_ours = lambda: asyncio.run(submit_all(base, key, n, args.steps, poll=True))  # noqa: E731
        run_naive = lambda: asyncio.run(submit_all(base + "/naive", None, n, args.steps, poll=False))  # noqa: E731
        run_ours(), run_naive()  # warm-up: first batches, first encodes
        lat_o, lat_b, span_o, span_b = [], [], [], []
        for _ in range(args.repeats):
            lb, sb = run_naive()
            lo, so = run_ours()
            lat_b += lb
            lat_o += lo
            span_b.append(sb)
            span_o.append(so)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    extra = {"requests_per_run": n, "runs": args.repeats, "steps": args.steps, "size": "32x32x9",
             "replicas": 1, "cpus_per_replica": 1, "ours_max_batch_size": 8}
    names = ("naive sync endpoint: generates in the request, 1 replica",
             "sora serve: async job + @serve.batch, 1 replica")
    for q in (50, 99):
        report(f"serve_submission_latency_p{q}", "seconds", (names[0], float(np.percentile(lat_b, q))),
               (names[1], float(np.percentile(lat_o, q))), higher_is_better=False, unit="s", extra=extra)
    report("serve_throughput", "videos/s", (names[0], n / float(np.median(span_b))),
           (names[1], n / float(np.median(span_o))), higher_is_better=True, unit="videos/s", extra=extra)


if __name__ == "__main__":
    main()
