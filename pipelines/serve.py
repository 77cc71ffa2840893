"""The OpenAI-style videos API on Ray Serve: an HTTP ingress and an autoscaled generator.

    HTTP client (e.g. openai.OpenAI(base_url=".../v1").videos)
        |  POST /v1/videos  GET /v1/videos[/{id}[/content]]  DELETE /v1/videos/{id}  POST .../remix
        v
    VideoAPI (ingress, FastAPI, 1 replica, 0 CPUs)       the only writer of new jobs
        |  validates (pipelines.video_requests), journals the job (pipelines.video_jobs) and
        |  answers; then stores its record and starts one asyncio task that dispatches it
        |  (a bounded number at a time) and watches it
        v
    VideoGenerator (autoscaled min..max replicas, a GPU each where the cluster has them)
           @serve.batch gathers requests; `JobRunner` generates each same-shape group as one
           packed SoraPipeline call, heartbeats its jobs, writes outputs + the final record

    serve run pipelines.serve:build_app model=MODEL storage=STORE      # or: sora serve --model MODEL

The submission path is short: small bodies are parsed on the event loop, and the POSTs that
arrive together are made durable by one write (`pipelines.serve_writes`: a group commit to
STORE/journal/ on a thread of its own, so reads for polling clients never queue ahead of it).
Each job's own record and active marker are written after the answer (after the burst), also
off the event loop; GET serves a job not yet stored and every finished job from memory. At
most `dispatch_limit` jobs are handed to the generator at once (enough to fill every replica
and to show the autoscaler a queue beyond them); the rest wait at the ingress, costing nothing.

Durable jobs. Records and outputs live in STORE (a directory or fsspec URL), never only in
memory: a POST is answered once its job is in the journal; a restarted ingress first stores what
the journal holds, then resumes every job still marked active; a replica that dies mid-job makes
the dispatching call fail at once (or, if it only hangs, its heartbeat goes stale), and the
ingress re-queues the job, up to `max_attempts` times, then fails it with a clear error. So a job
ends completed or failed; it is never lost and never left in progress. The queue is bounded:
beyond `max_queue` unfinished jobs, POST answers 429 with Retry-After.

Autoscaling. Each dispatched job is one request to the generator; Serve counts the ones queued
at the ingress's handle and running on replicas, and adds replicas while there are more than
`target_ongoing_requests` per replica. One ingress replica is the design (it owns dispatch);
Serve restarts it if it dies, and the restart resumes from STORE.

Under a burst of POSTs, Serve's HTTP proxy (its hop to the ingress replica) and FastAPI's
per-request machinery cost more than this code: the hot routes skip FastAPI
(`pipelines.serve_fastpath.FastPath`), and with `http_port` the ingress replica answers HTTP
itself (uvicorn in the replica, no proxy hop). Its event loop runs at niceness `ingress_nice` (0), not
at the 15 Ray starts workers at: there, any busy process at the default priority on the node
would take the CPU from a burst. `benchmarks/bench_serve.py` measures both ways in.
"""

# NOTE: no `from __future__ import annotations` here. Serve cloudpickles the FastAPI app, and
# cloudpickle keeps only the globals a function's code uses: a route's string annotation
# "Request" could then not be resolved in the replica, and FastAPI would read `request` as a
# query parameter (every call a 400).
import asyncio
import hmac
import json
import logging
import math
import os
import statistics
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.ray_utils import wait_for_serve_proxy
from pipelines.serve_fastpath import SERVER_ERROR, FastJSONResponse, FastPath, start_http_server, warm_http
from pipelines.serve_config import ServeConfig
from pipelines.serve_writes import Burst, JobWrites
from pipelines.stage import resolve_num_gpus
from pipelines.video_jobs import (FINAL, VARIANTS, JobStore, heartbeat_age, is_id, json_bytes, new_id, new_record,
                                  public_view)
from pipelines.video_requests import (APIError, ModelInfo, parse_body, parse_create, parse_list_query, parse_remix,
                                      parse_variant)
from pipelines.video_runner import JobRunner, StepHook
from sora.process_memory import keep_model_memory

__all__ = ["ServeConfig", "JobRunner", "VideoGenerator", "VideoAPI", "build_app", "application", "run_server"]

logger = logging.getLogger("ray.serve")  # lands in the replica's Serve log

INLINE_BODY_BYTES = 16 << 10  # bodies up to this size are parsed on the event loop (no thread hop)
FINAL_CACHE = 4096  # finished records the ingress keeps in memory for GET


def dispatch_limit(cfg: ServeConfig) -> int:
    """Generator calls the ingress keeps in flight: every replica's `max_ongoing_requests` plus
    one replica's worth queued at the handle, where Serve's autoscaler counts it (and at least
    `max_replicas` x `target_ongoing_requests`, so the autoscaler can always ask for them all)."""
    per_replica = max(2 * cfg.max_batch_size, math.ceil(cfg.target_ongoing_requests))
    return (cfg.max_replicas + 1) * per_replica


def lower_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's niceness (Linux: a thread's own; the threads it starts,
    e.g. torch's intra-op pool, inherit it). Where the OS has no per-thread priority: unchanged."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as e:
        logger.warning("generation keeps the default CPU priority (%s)", e)


def set_thread_nice(nice: int | None) -> int | None:
    """Set the calling thread's niceness to ``nice`` (Linux: a thread's own; threads it starts later
    inherit it) -> the niceness it runs at (None where the OS has no per-thread priority).

    FOOTGUN: Ray starts every worker process at niceness 15, so an ingress left there gets ~3 % of a
    core beside any process at the default 0 (Linux CFS weights 36 vs 1024): a burst of POSTs then
    waits on whatever else the node runs. Going below the current niceness needs CAP_SYS_NICE (root)
    or RLIMIT_NICE; without it the thread keeps its niceness and this logs why."""
    try:
        tid = threading.get_native_id()
        if nice is not None and os.getpriority(os.PRIO_PROCESS, tid) != nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except AttributeError:
        return None
    except OSError as e:
        kept = os.getpriority(os.PRIO_PROCESS, tid)
        logger.warning("the ingress keeps niceness %d, not %s (%s): bursts of requests compete with Ray's "
                       "workers for the CPU; grant CAP_SYS_NICE or set ingress_nice=None", kept, nice, e)
        return kept


# ----------------------------------------------------------------------------------------
# The generator deployment (its work is `pipelines.video_runner.JobRunner`, testable without Serve)
# ----------------------------------------------------------------------------------------


@serve.deployment(name="VideoGenerator")
class VideoGenerator:
    """A generator replica. Its calls are batched by `@serve.batch`, then grouped by shape."""

    def __init__(self, cfg: dict[str, Any], on_step: StepHook | None = None):
        config = ServeConfig.from_args(cfg)
        # the model's activations (a video's VAE decode: hundreds of MB) stay in the process for
        # the next job instead of coming back from the kernel as fresh pages (`sora.process_memory`)
        keep_model_memory()
        try:
            worker = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (unit tests)
            worker = "local"
        self.runner = JobRunner(config, worker, on_step)
        self.generate_batch.set_max_batch_size(config.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        # the pipeline is CPU/GPU-bound: it runs off the event loop (health checks and the next
        # batch's requests are still answered), on a thread of lower CPU priority: on a node it
        # shares with the ingress, a burst of submissions is answered before generation goes on
        self._work = ThreadPoolExecutor(1, thread_name_prefix="sora-generate", initializer=lower_priority,
                                        initargs=(config.generator_nice,))

    async def generate(self, video_id: str) -> str:
        return await self.generate_batch(video_id)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.2)
    async def generate_batch(self, ids: list[str]) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(self._work, self.runner.run_jobs, ids)

    def check_health(self) -> None:
        self.runner.check()

    def __del__(self):
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()


# ----------------------------------------------------------------------------------------
# The ingress
# ----------------------------------------------------------------------------------------

api = FastAPI(title="sora videos API", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
api.add_middleware(FastPath)


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request")
    message = {404: "no such route", 405: "method not allowed on this route"}.get(e.status_code, str(e.detail))
    err = APIError(e.status_code if 400 <= e.status_code < 500 else 400, message, code=code)
    return JSONResponse(err.body(), status_code=err.status, headers=getattr(e, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse(APIError(400, "invalid request").body(), status_code=400)


@api.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(SERVER_ERROR, status_code=500)


def _not_found(video_id: str) -> APIError:
    return APIError(404, f"no video with id {video_id[:80]!r}", param="video_id", code="not_found")


async def _await(response) -> Any:
    return await response


def _job_record(vid: str, spec: dict[str, Any], request) -> dict[str, Any]:
    return new_record(vid, model=spec["model"], prompt=spec["prompt"], size=spec["size"], seconds=spec["seconds"],
                      output_size=spec["output_size"], job=request.to_dict(), remixed_from=spec.get("remixed_from"))


@serve.deployment(name="VideoAPI", num_replicas=1)
@serve.ingress(api)
class VideoAPI:
    async def __init__(self, generator, cfg: dict[str, Any]):
        from sora.model_dir import read_index

        self.cfg = ServeConfig.from_args(cfg)
        # first: the threads started below (journal, records, reads) inherit this thread's priority
        self.nice = set_thread_nice(self.cfg.ingress_nice)
        key = self.cfg.api_key if self.cfg.api_key is not None else os.environ.get("SORA_API_KEY")
        self._key = key.encode("utf-8") if key else None
        if self._key is None:
            logger.warning("sora serve: no API key set (api_key / $SORA_API_KEY): the API is open to anyone")
        self.model = ModelInfo.from_index(read_index(self.cfg.model), self.cfg.model_name)
        self.store = JobStore(self.cfg.storage)
        await asyncio.to_thread(self.store.check)
        self.generator = generator
        self.tasks: dict[str, asyncio.Task] = {}  # one per stored, unfinished job: dispatch + watch
        self.burst = Burst()  # the POSTs arriving together: what waits until they are answered
        self.writes = JobWrites(self.store, self._start, self.burst)  # journal group commit, then each record
        self._final: OrderedDict[str, dict[str, Any]] = OrderedDict()  # finished records, newest last
        self._service_s: deque[float] = deque(maxlen=64)  # recent started -> completed times
        self._dispatching = asyncio.Semaphore(dispatch_limit(self.cfg))
        await asyncio.to_thread(self.store.replay_journal)  # answered before a restart: store them first
        for vid in await asyncio.to_thread(self.store.active_ids):  # resume after a restart
            self._start(vid)
        self._http = None if self.cfg.http_port is None else start_http_server(  # the hot routes before FastAPI
            FastPath(api, owner=lambda: self), self.cfg.http_host, self.cfg.http_port, self.cfg.ingress_max_ongoing)
        await self._warm_up()

    async def _warm_up(self) -> None:
        """Take each step of a submission once before the first client does (lazy imports,
        first-call caches; on `http_port` uvicorn's first connection and request), so the first
        burst costs what later ones do. Nothing is stored. Serve collects and freezes (gc) what
        the start-up leaves once __init__ returns."""
        body = json.dumps({"prompt": "a warm-up request"}).encode()
        try:
            spec, _ = parse_create(*parse_body("application/json", body), self.cfg.limits, self.model,
                                   self.cfg.http_limits)
            rec = _job_record(new_id(), spec, spec["request"])
            FastJSONResponse(public_view(rec))
            json_bytes([rec])  # the journal's encoding
        except APIError:  # limits that refuse the default request: the rest is warm
            pass
        except Exception:  # noqa: BLE001 - a warm-up never stops the ingress from starting
            logger.warning("warming the submission path failed", exc_info=True)
        if self._http is not None:
            auth = {"authorization": f"Bearer {self._key.decode()}"} if self._key else {}
            try:  # a well-formed id no job has: the fast path's GET and its 404
                await warm_http(self._http[0], self.cfg.http_host, self.cfg.http_port, f"/v1/videos/{new_id()}", auth)
            except (OSError, asyncio.TimeoutError) as e:  # its own port unreachable from itself: not fatal here
                logger.warning("warming the ingress's port %d failed: %s", self.cfg.http_port, e)

    def __del__(self):
        if getattr(self, "_http", None) is not None:
            self._http[0].should_exit = True

    def check_health(self) -> None:
        self.store.check()

    # -- helpers -------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not depend on how much of the key matched
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1", "replace"), self._key)
        if not ok:
            raise APIError(401, "missing or incorrect API key; send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.http_limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise APIError(400, "invalid Content-Length", code="invalid_request")
            if int(declared) > limit:
                raise APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _queue_full(self) -> APIError:
        service = statistics.median(self._service_s) if self._service_s else 5.0
        # within about one service time a running batch finishes and frees its slots
        retry = max(1, min(60, math.ceil(service)))
        return APIError(429, f"the queue is full ({self.cfg.max_queue} unfinished jobs); retry in {retry} s",
                        type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})

    def _unfinished(self) -> int:
        return len(self.tasks) + self.writes.unfinished()

    async def _get(self, video_id: str) -> dict[str, Any]:
        if not is_id(video_id):
            raise _not_found(video_id)
        rec = self.writes.pending.get(video_id) or self._final.get(video_id)
        if rec is None:
            rec = await asyncio.to_thread(self.store.get, video_id)
            if rec is None:
                raise _not_found(video_id)
            self._remember(rec)
        return rec

    def _remember(self, rec: dict[str, Any] | None) -> None:
        """Keep a finished record for GET (it no longer changes; DELETE forgets it)."""
        if rec is not None and rec["status"] in FINAL:
            self._final[rec["id"]] = rec
            self._final.move_to_end(rec["id"])
            while len(self._final) > FINAL_CACHE:
                self._final.popitem(last=False)

    async def _parse(self, request: Request, body: bytes, parse, *args):
        """``parse(fields, files, *args)`` of a body: small ones on the event loop, large ones
        (an image to decode) on a thread."""
        ctype = request.headers.get("content-type")
        if len(body) <= INLINE_BODY_BYTES:
            return parse(*parse_body(ctype, body), *args)
        fields_, files = await asyncio.to_thread(parse_body, ctype, body)
        return await asyncio.to_thread(parse, fields_, files, *args)

    async def _accept(self, spec: dict[str, Any], image: bytes | None) -> JSONResponse:
        if self._unfinished() >= self.cfg.max_queue:
            raise self._queue_full()
        self.writes.reserved += 1  # no await between the check and this: the bound is exact
        handed = False  # once queued for the journal, the commit loop moves the slot to writes.pending
        try:
            vid = new_id()
            request = spec["request"]
            if image is not None:  # the request's image becomes the stored PNG
                request = replace(request, image=self.store.input_url(vid))
                await asyncio.to_thread(self.store.write_input, vid, image)
            rec = _job_record(vid, spec, request)
            handed = True
            await self.writes.commit(rec)
        finally:
            if not handed:
                self.writes.reserved -= 1
        return FastJSONResponse(public_view(rec))

    # -- dispatch: one task per unfinished job ---------------------------------------------

    def _start(self, video_id: str) -> None:
        task = self.tasks.get(video_id)
        if task is None or task.done():
            self.tasks[video_id] = asyncio.get_running_loop().create_task(self._drive(video_id))

    async def _drive(self, vid: str) -> None:
        """Dispatch a job until it is final: re-queue it when its replica dies or hangs (up to
        max_attempts runs in all), then fail it with the reason."""
        failures = 0
        rec: dict[str, Any] | None = None
        try:
            while True:
                outcome, error = await self._dispatch(vid)
                rec = await asyncio.to_thread(self.store.get, vid)
                if rec is None or rec["status"] in FINAL:
                    return
                if outcome == "busy":  # another replica holds it (e.g. after our restart): watch it
                    error = await self._watch(vid)
                    if error is None:
                        rec = None
                        continue
                    rec = await asyncio.to_thread(self.store.get, vid)
                    if rec is None or rec["status"] in FINAL:
                        return
                failures += 1
                error = error or f"the replica returned {outcome!r}"
                attempts = max(failures, int(rec.get("attempts", 0)))
                rec.setdefault("history", []).append({"attempt": attempts, "error": error, "at": time.time()})
                if attempts >= self.cfg.max_attempts:
                    rec.update(status="failed", error={
                        "code": "replica_failed",
                        "message": f"generation was attempted {attempts} times and did not finish; "
                                   f"last error: {error}"[:500]})
                    logger.warning("job %s failed after %d attempts: %s", vid, attempts, error)
                else:
                    rec.update(status="queued", progress=0, worker=None, heartbeat_at=None)
                    logger.warning("job %s re-queued (attempt %d failed: %s)", vid, attempts, error)
                await asyncio.to_thread(self.store.put, rec)
                if rec["status"] == "failed":
                    return
                rec = None
                await asyncio.sleep(min(5.0, 0.5 * failures))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - never leave a job behind without a verdict
            logger.exception("dispatch of %s crashed", vid)
            rec = await asyncio.to_thread(self.store.get, vid)
            if rec is not None and rec["status"] not in FINAL:
                rec.update(status="failed", error={"code": "internal_error", "message": f"{type(e).__name__}"})
                await asyncio.to_thread(self.store.put, rec)
        finally:
            self.tasks.pop(vid, None)
            if rec is None or rec["status"] not in FINAL:  # cancelled, or left by an error: look again
                rec = await asyncio.to_thread(self.store.get, vid)
            if rec is None or rec["status"] in FINAL:
                await asyncio.to_thread(self.store.clear_active, vid)
            self._remember(rec)
            if rec is not None and rec["status"] == "completed" and rec.get("started_at"):
                self._service_s.append(max(0.0, time.time() - float(rec["started_at"])))

    @property
    def _watch_every_s(self) -> float:
        return max(self.cfg.heartbeat_s, self.cfg.stale_after_s / 4)

    async def _dispatch(self, vid: str) -> tuple[str | None, str | None]:
        """One generator call, watched: -> (outcome, None), or (None, why it failed)."""
        async with self._dispatching:
            return await self._call_generator(vid)

    async def _call_generator(self, vid: str) -> tuple[str | None, str | None]:
        response = self.generator.generate.remote(vid)
        fut = asyncio.ensure_future(_await(response))
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=self._watch_every_s)
                if done:
                    try:
                        return fut.result(), None
                    except Exception as e:  # noqa: BLE001 - ActorDiedError, cancellation, a bug...
                        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rec = await asyncio.to_thread(self.store.get, vid)
                if rec is None:
                    return "deleted", None
                age = heartbeat_age(rec)
                if rec["status"] == "in_progress" and age > self.cfg.stale_after_s:
                    return None, f"no heartbeat for {age:.0f} s (the replica hung or was lost)"
        finally:
            if not fut.done():
                response.cancel()
                fut.cancel()

    async def _watch(self, vid: str) -> str | None:
        """Wait for a job another replica runs: None once it is final, gone or re-queued;
        the reason when its heartbeat goes stale."""
        while True:
            await asyncio.sleep(self._watch_every_s)
            rec = await asyncio.to_thread(self.store.get, vid)
            if rec is None or rec["status"] in FINAL or rec["status"] == "queued":
                return None
            age = heartbeat_age(rec)
            if age > self.cfg.stale_after_s:
                return f"no heartbeat for {age:.0f} s (the replica hung or was lost)"

    # -- routes --------------------------------------------------------------------------

    @api.post("/v1/videos")
    async def create(self, request: Request):
        with self.burst.post():
            self._auth(request)
            if self._unfinished() >= self.cfg.max_queue:  # before reading a body we would drop
                raise self._queue_full()
            body = await self._body(request)
            spec, image = await self._parse(request, body, parse_create, self.cfg.limits, self.model,
                                            self.cfg.http_limits)
            return await self._accept(spec, image)

    @api.get("/v1/videos")
    async def list_videos(self, request: Request):
        self._auth(request)
        after, limit, order = parse_list_query(dict(request.query_params))
        await self.writes.stored(list(self.writes.pending))  # every job answered so far is listed
        recs, has_more = await asyncio.to_thread(self.store.page, after, limit, order)
        data = [public_view(r) for r in recs]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": has_more})

    @api.get("/v1/videos/{video_id}")
    async def retrieve(self, video_id: str, request: Request):
        self._auth(request)
        rec = await self._get(video_id)
        headers = {} if rec["status"] in FINAL else {"openai-poll-after-ms": str(self.cfg.poll_after_ms)}
        return FastJSONResponse(public_view(rec), headers=headers)

    @api.delete("/v1/videos/{video_id}")
    async def delete(self, video_id: str, request: Request):
        self._auth(request)
        await self._get(video_id)
        await self.writes.stored([video_id])
        self._final.pop(video_id, None)
        if not await asyncio.to_thread(self.store.delete, video_id):
            raise _not_found(video_id)
        task = self.tasks.pop(video_id, None)
        if task is not None:
            task.cancel()
        self._final.pop(video_id, None)  # in case its task finished (and kept it) meanwhile
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    @api.get("/v1/videos/{video_id}/content")
    async def content(self, video_id: str, request: Request):
        self._auth(request)
        variant = parse_variant(dict(request.query_params))
        rec = await self._get(video_id)
        if rec["status"] != "completed":
            raise APIError(400, f"video {video_id} is {rec['status']}; content exists once it is completed",
                           param="video_id", code="video_not_ready")
        try:
            data = await asyncio.to_thread(self.store.read_bytes, self.store.output_url(video_id, variant))
        except FileNotFoundError:
            raise _not_found(video_id) from None
        return Response(content=data, media_type=VARIANTS[variant][1])

    @api.post("/v1/videos/{video_id}/remix")
    async def remix(self, video_id: str, request: Request):
        self._auth(request)
        source = await self._get(video_id)
        body = await self._body(request)
        spec = await self._parse(request, body, parse_remix, self.cfg.limits, self.model, source,
                                 self.store.request_of(source), self.store.output_url(video_id, "video"),
                                 self.cfg.remix_strength)
        return await self._accept(spec, None)


# ----------------------------------------------------------------------------------------
# The application
# ----------------------------------------------------------------------------------------


def build_app(args: dict[str, Any]):
    """The Serve application (`serve run pipelines.serve:build_app model=DIR storage=URL`, or a
    RayService serveConfigV2 with import_path + args). Keys: `ServeConfig` fields."""
    return application(ServeConfig.from_args(dict(args)))


def application(cfg: ServeConfig, on_step: StepHook | None = None):
    """The Serve application of a config. ``on_step`` (code, not configuration: e.g. a test
    slowing generation down) is called after every denoising step on the generator replicas."""
    cfg = replace(cfg, num_gpus=resolve_num_gpus(cfg.num_gpus))  # the replicas see what they were given
    generator = VideoGenerator.options(
        autoscaling_config={
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "initial_replicas": max(cfg.min_replicas, 1),
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
            "metrics_interval_s": cfg.metrics_interval_s, "look_back_period_s": cfg.look_back_period_s,
        },
        # two batches' worth per replica: the next batch gathers while one runs; the rest wait
        # at the ingress's handle, where Serve counts them for autoscaling
        max_ongoing_requests=2 * cfg.max_batch_size,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
    ).bind(cfg.to_args(), on_step)
    return VideoAPI.options(
        max_ongoing_requests=cfg.ingress_max_ongoing,
        ray_actor_options={"num_cpus": 0},
        health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
    ).bind(generator, cfg.to_args())


def run_server(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, app_name: str = "sora", *,
               on_step: StepHook | None = None, proxy_start_s: float = 300.0):
    """Start Serve's HTTP proxy on host:port, deploy the app and return the ingress handle once the
    proxy answers on host:port, and the ingress on its `http_port` if set (at most `proxy_start_s`).
    The caller keeps the process alive and calls `serve.shutdown()`.

    Serve's controller gives a new proxy a few seconds to come up and replaces it, with a longer
    deadline each time, when it does not; `serve.start` raises with the first one's death. On a
    starved machine that is the normal case, so it is waited out here."""
    import ray

    deadline = time.monotonic() + proxy_start_s
    try:
        serve.start(http_options={"host": host, "port": int(port)})
    except (ray.exceptions.ActorDiedError, TimeoutError) as e:  # the controller is up and restarts its proxy
        logger.warning("Serve's HTTP proxy was not up in time (%s); waiting for the controller's next one",
                       type(e).__name__)
    cfg = ServeConfig.from_args(dict(args))
    handle = serve.run(application(cfg, on_step), name=app_name, route_prefix="/", blocking=False)
    wait_for_serve_proxy(host, port, max(deadline - time.monotonic(), 1.0))
    if cfg.http_port is not None:  # the ingress replica's own port (it answers once the replica is up)
        wait_for_serve_proxy(cfg.http_host, cfg.http_port, max(deadline - time.monotonic(), 1.0))
    return handle

