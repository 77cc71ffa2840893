"""The ingress's fast path (`pipelines.serve_fastpath`) answers exactly as FastAPI does.

Two apps of the videos API on one Serve (inside the session's Ray), the same config but for
`fast_path`: "plain" sends every request through FastAPI, "fast" answers POST /v1/videos and
GET /v1/videos/{id} itself and also listens on its own `http_port` (uvicorn in the ingress
replica). The same requests - a success, bad keys, bad JSON and fields, a body over the limit,
unknown ids, other routes (test_serve's hostile set), a full queue - get the same status, the
same JSON body (ids aside) and the same headers on all three ways in, and every accepted job
completes. Real HTTP on 127.0.0.1, real Serve, the tiny random model.

Also here: what keeps a burst of submissions fast - the write path's group commit and deferred
record writes (`pipelines.serve_writes`), generation at a lower CPU priority, the start-up
request through the ingress's own port."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time

import pytest

from sora.process_memory import MODEL_TRIM_MB, _glibc
from test_serve import CONFIG, FINAL, KEY, hostile_cases
from tiny_model import build_tiny_model

STEP_DELAY_S = 0.05
HEADERS = ("content-type", "retry-after", "openai-poll-after-ms", "www-authenticate")
VOLATILE = ("id", "created_at", "completed_at", "expires_at")
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nice_log(tmp_path_factory):
    """The niceness of the thread each denoising step of the apps' generators ran on, a line each."""
    return tmp_path_factory.mktemp("nice") / "generation-nice.txt"


@pytest.fixture(scope="module")
def apps(ray_session, tmp_path_factory, nice_log):
    import httpx
    from ray import serve

    from pipelines.ray_utils import wait_for_serve_proxy
    from pipelines.serve import application
    from pipelines.serve_config import ServeConfig

    root = tmp_path_factory.mktemp("fastpath")
    model = build_tiny_model(str(root / "model"))
    proxy, own = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": proxy})
    def step(step, steps, stage):  # a hook (travels by value): slows generation, notes niceness
        time.sleep(STEP_DELAY_S)
        with open(nice_log, "a") as f:  # this thread's and the replica's main thread's (tid = pid)
            f.write(f"{os.getpriority(os.PRIO_PROCESS, threading.get_native_id())} "
                    f"{os.getpriority(os.PRIO_PROCESS, os.getpid())}\n")
        from sora.process_memory import kept_memory

        with open(nice_log.with_name("generation-memory.txt"), "a") as f:  # the replica's heap setting
            f.write(f"{kept_memory()}\n")

    base = {**CONFIG, "model": model, "max_queue": 4, "max_replicas": 1}
    for name, extra in (("plain", {"fast_path": False}), ("fast", {"http_port": own})):
        cfg = ServeConfig.from_args({**base, **extra, "storage": str(root / name)})
        serve.run(application(cfg, step), name=name, route_prefix=f"/{name}", blocking=False)
    wait_for_serve_proxy("127.0.0.1", proxy, 300)
    urls = {"plain": f"http://127.0.0.1:{proxy}/plain", "fast": f"http://127.0.0.1:{proxy}/fast",
            "fast-own-port": f"http://127.0.0.1:{own}"}
    clients = {k: httpx.Client(base_url=u, timeout=60) for k, u in urls.items()}  # no key unless a call sends it
    deadline = time.monotonic() + 300
    for c in clients.values():  # both apps running, the own port listening
        while True:
            try:
                if c.get("/v1/videos", params={"limit": 1}, headers=AUTH).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{c.base_url} did not come up"
            time.sleep(0.5)
    try:
        yield clients
    finally:
        for c in clients.values():
            c.close()
        serve.shutdown()


def answer(r) -> tuple[int, object, dict[str, str]]:
    """What a client sees of a response, without the parts that differ per job."""
    body = r.json()
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in VOLATILE}
    return r.status_code, body, {h: r.headers[h] for h in HEADERS if h in r.headers}


def wait_final(client, ids, timeout=120.0) -> dict[str, dict]:
    out, deadline = {}, time.monotonic() + timeout
    while len(out) < len(ids):
        assert time.monotonic() < deadline, f"not final after {timeout} s: {set(ids) - set(out)}"
        for vid in set(ids) - set(out):
            r = client.get(f"/v1/videos/{vid}", headers=AUTH)
            assert r.status_code == 200, r.text
            if r.json()["status"] in FINAL:
                out[vid] = r.json()
        time.sleep(0.2)
    return out


def test_fast_path_takes_only_the_hot_routes():
    from pipelines.serve_fastpath import FastPath

    route = FastPath(app=None)._route
    http = lambda method, path, root="": {"type": "http", "method": method, "path": root + path,  # noqa: E731
                                          "root_path": root}
    assert route(http("POST", "/v1/videos")) == ("create", None)
    assert route(http("POST", "/v1/videos", root="/sora")) == ("create", None)
    assert route(http("GET", "/v1/videos/video_abc")) == ("retrieve", "video_abc")
    assert route(http("GET", "/v1/videos/..", root="/x")) == ("retrieve", "..")
    for method, path in [("GET", "/v1/videos"), ("GET", "/v1/videos/"), ("GET", "/v1/videos/a/content"),
                         ("POST", "/v1/videos/a/remix"), ("DELETE", "/v1/videos/a"), ("HEAD", "/v1/videos/a"),
                         ("PUT", "/v1/videos"), ("POST", "/v1/videos/"), ("POST", "/v1/videosx"), ("GET", "/")]:
        assert route(http(method, path)) is None, (method, path)
    assert route({"type": "websocket", "path": "/v1/videos", "root_path": ""}) is None
    assert route({"type": "lifespan"}) is None


def test_http_port_taken_or_invalid_is_a_clear_error():
    from pipelines.serve_config import ServeConfig
    from pipelines.serve_fastpath import start_http_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]

        async def start():
            start_http_server(None, "127.0.0.1", port)

        with pytest.raises(OSError, match="pick a free http_port"):
            asyncio.run(start())
    for bad in (0, 70000, -1):
        with pytest.raises(ValueError, match="http_port"):
            ServeConfig(model="m", http_port=bad)


def test_fast_path_and_fastapi_answer_alike(apps):
    # a job each, completed (the hostile set needs a finished job to aim at)
    job = {"prompt": "a red circle", "seconds": 1, "num_inference_steps": 2}
    created = {k: c.post("/v1/videos", json=job, headers=AUTH) for k, c in apps.items()}
    first = {k: answer(r) for k, r in created.items()}
    assert first["plain"][0] == 200, created["plain"].text
    assert first["fast"] == first["plain"] and first["fast-own-port"] == first["plain"]
    ids = {k: r.json()["id"] for k, r in created.items()}
    for k, c in apps.items():
        status, body, headers = answer(c.get(f"/v1/videos/{ids[k]}", headers=AUTH))
        assert status == 200 and (body["status"] in FINAL or headers["openai-poll-after-ms"] == "100"), body
    done = {k: wait_final(apps[k], [ids[k]])[ids[k]] for k in apps}
    assert all(d["status"] == "completed" for d in done.values()), done
    finished = {k: answer(apps[k].get(f"/v1/videos/{ids[k]}", headers=AUTH)) for k in apps}
    assert finished["fast"] == finished["plain"] == finished["fast-own-port"]
    assert finished["plain"][0] == 200 and "openai-poll-after-ms" not in finished["plain"][2]

    cases = {k: hostile_cases(ids[k]) for k in apps}
    n = len(cases["plain"])
    assert n > 200
    seen: dict[int, int] = {}
    for i in range(n):
        got = {}
        for k, c in apps.items():
            method, path, kwargs = cases[k][i]
            r = c.request(method, path, **kwargs)
            body = r.text.replace(ids[k], "VIDEO_ID")  # a job's id in an error message
            got[k] = (r.status_code, body, {h: r.headers[h] for h in HEADERS if h in r.headers})
        assert got["fast"] == got["plain"], (cases["plain"][i][:2], got)
        assert got["fast-own-port"] == got["plain"], (cases["plain"][i][:2], got)
        assert 400 <= got["plain"][0] < 500, (cases["plain"][i][:2], got["plain"])
        seen[got["plain"][0]] = seen.get(got["plain"][0], 0) + 1
    assert {400, 401, 404, 405, 413} <= set(seen), seen  # every kind of rejection was compared

    # a declared Content-Length over the limit is refused before the body is read: the same 413
    big = b'{"prompt": "' + b"x" * (300 << 10) + b'"}'
    over = {k: answer(c.post("/v1/videos", content=big, headers={**AUTH, "Content-Type": "application/json"}))
            for k, c in apps.items()}
    assert over["plain"][0] == 413 and over["fast"] == over["plain"] == over["fast-own-port"]
    # nothing but the first jobs was made (the own port is the fast app's second way in)
    made = {"plain": {ids["plain"]}, "fast": {ids["fast"], ids["fast-own-port"]}}
    for k in made:
        assert {v["id"] for v in apps[k].get("/v1/videos", headers=AUTH).json()["data"]} == made[k]


def test_a_full_queue_gets_the_same_429_and_every_accepted_job_completes(apps):
    job = {"prompt": "a blue square", "seconds": 1, "num_inference_steps": 20}  # ~1 s each: the queue stays full
    answers = {}
    accepted = {}
    for k in ("plain", "fast"):  # the own port shares the fast app's queue: it is the third way into it
        rs = [apps[k].post("/v1/videos", json=job, headers=AUTH) for _ in range(4)]
        assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
        accepted[k] = [r.json()["id"] for r in rs]
        answers[k] = answer(apps[k].post("/v1/videos", json=job, headers=AUTH))
    answers["fast-own-port"] = answer(apps["fast-own-port"].post("/v1/videos", json=job, headers=AUTH))
    assert answers["plain"][0] == 429 and answers["plain"][1]["error"]["code"] == "queue_full", answers
    assert answers["fast"] == answers["fast-own-port"]  # one app: the very same answer
    # the two apps' Retry-After is each one's own median service time: the same answer but that number
    retry = {k: a[2]["retry-after"] for k, a in answers.items()}
    assert all(r.isdigit() for r in retry.values()), retry
    same = {k: (a[0], a[1]["error"]["message"].replace(f"retry in {retry[k]} s", "retry in N s"),
                {**a[1]["error"], "message": None}, sorted(a[2])) for k, a in answers.items()}
    assert same["fast"] == same["plain"], same
    for k in ("plain", "fast"):
        done = wait_final(apps[k], accepted[k])
        assert [done[i]["status"] for i in accepted[k]] == ["completed"] * 4, done


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_generation_yields_the_cpu_and_the_replica_does_not(apps, nice_log):
    from pipelines.serve import lower_priority
    from pipelines.serve_config import ServeConfig

    r = apps["fast"].post("/v1/videos", json={"prompt": "a green dot", "seconds": 1, "num_inference_steps": 2},
                          headers=AUTH)
    assert r.status_code == 200, r.text
    assert wait_final(apps["fast"], [r.json()["id"]])[r.json()["id"]]["status"] == "completed"
    # every generator step so far ran at the configured niceness (the default) on top of its replica's
    # (Ray starts workers niced already: raylet's worker_niceness)
    nice = ServeConfig(model="m").generator_nice
    ran = {tuple(int(x) for x in line.split()) for line in nice_log.read_text().splitlines()}
    assert ran and all(step == min(19, replica + nice) and replica < 19 for step, replica in ran), ran
    # the replica keeps its model's large freed blocks for the next job (sora.process_memory)
    kept = set(nice_log.with_name("generation-memory.txt").read_text().splitlines())
    assert kept == {str((MODEL_TRIM_MB, None) if _glibc() is not None else None)}, kept
    base = os.getpriority(os.PRIO_PROCESS, 0)
    # only the calling thread (and what it starts) is lowered
    seen = {}

    def worker():
        lower_priority(3)
        seen["worker"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        child = threading.Thread(target=lambda: seen.update(child=os.getpriority(os.PRIO_PROCESS, 0)))
        child.start()
        child.join()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"worker": min(19, base + 3), "child": min(19, base + 3)}, seen
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="generator_nice"):
            ServeConfig(model="m", generator_nice=bad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_the_ingress_answers_at_ingress_nice_and_its_replica_keeps_rays(apps):
    import psutil

    from pipelines.serve_config import ServeConfig

    port = apps["fast-own-port"].base_url.port
    pid = next(c.pid for c in psutil.net_connections(kind="tcp")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == port)  # the fast app's ingress replica

    def comm(tid: int) -> str:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()

    # Python's threads carry the process title ("ray::ServeReplica..."); Ray's C++ threads, started
    # before the worker niced itself, have names of their own (and niceness 0 already)
    nice = {t.id: os.getpriority(os.PRIO_PROCESS, t.id) for t in psutil.Process(pid).threads()
            if comm(t.id).startswith("ray::")}
    want = ServeConfig(model="m").ingress_nice
    assert want == 0 and nice[pid] > want, nice  # Ray started the replica niced (its main thread keeps that)
    # the event loop that serves the port and the journal/record/read threads it started
    assert sum(n == want for n in nice.values()) >= 2, nice


def test_set_thread_nice_sets_the_calling_thread_and_what_it_starts(monkeypatch):
    from pipelines.serve import logger, set_thread_nice

    warned = []
    monkeypatch.setattr(logger, "warning", lambda msg, *args: warned.append(msg % args))
    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen = {}

    def worker():
        seen["set"] = set_thread_nice(min(19, base + 4))
        seen["kept"] = set_thread_nice(None)
        child = threading.Thread(target=lambda: seen.update(child=os.getpriority(os.PRIO_PROCESS, 0)))
        child.start()
        child.join()
        if os.geteuid() == 0:  # raising a priority back needs the privilege root has
            seen["back"] = set_thread_nice(base)

        def refuse(*args):
            raise PermissionError(1, "Operation not permitted")

        setpriority = os.setpriority

        monkeypatch.setattr(os, "setpriority", refuse)
        seen["refused"] = set_thread_nice(base - 1)  # kept, with a warning that says how to grant it
        monkeypatch.setattr(os, "setpriority", setpriority)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    up = min(19, base + 4)
    assert seen == {"set": up, "kept": up, "child": up, "refused": seen.get("back", up),
                    **({"back": base} if os.geteuid() == 0 else {})}, seen
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # only that thread moved
    assert len(warned) == 1 and "CAP_SYS_NICE" in warned[0], warned
    from pipelines.serve_config import ServeConfig

    for bad in (-21, 20):
        with pytest.raises(ValueError, match="ingress_nice"):
            ServeConfig(model="m", ingress_nice=bad)
    assert ServeConfig.from_args({"model": "m", "ingress_nice": "none"}).ingress_nice is None


def test_warm_http_sends_one_request_through_the_server():
    from pipelines.serve_fastpath import start_http_server, warm_http

    seen = []

    async def app(scope, receive, send):  # a bare ASGI app: notes the request, answers 404
        seen.append((scope["method"], scope["path"], dict(scope["headers"]).get(b"authorization")))
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"no"})

    async def main():
        server, task = start_http_server(app, "127.0.0.1", free_port())
        try:
            return await warm_http(server, "127.0.0.1", server.config.port, "/v1/videos/x", {"authorization": "k"})
        finally:
            server.should_exit = True
            await task

    assert asyncio.run(main()) == 404
    assert seen == [("GET", "/v1/videos/x", b"k")]


def test_a_burst_is_journaled_together_and_stored_after_it(tmp_path):
    import gc

    from pipelines.serve_writes import BURST_S, QUIET_S, Burst, JobWrites
    from pipelines.video_jobs import JobStore, new_id, new_record

    store = JobStore(str(tmp_path / "store"))
    started = []
    burst = Burst()
    writes = JobWrites(store, started.append, burst)
    recs = [new_record(new_id(), model="m", prompt=f"p{i}", size="32x32", seconds="1", output_size="32x32", job={})
            for i in range(20)]
    ids = {r["id"] for r in recs}

    async def main():
        posting = True

        async def posts():  # POSTs keep arriving, 5 ms apart
            while posting:
                with burst.post():
                    await asyncio.sleep(0.005)

        poster = asyncio.ensure_future(posts())
        await asyncio.sleep(0)
        writes.reserved += len(recs)
        await asyncio.gather(*(writes.commit(r) for r in recs))
        # durable (journaled) and readable, not yet stored: the burst goes on
        journaled = {r["id"] for url in store.journal_files() for r in store.read_journal(url)}
        assert journaled == ids and len(store.journal_files()) <= 2
        assert writes.reserved == 0 and set(writes.pending) == ids and writes.unfinished() == len(ids)
        assert started == [] and store.active_ids() == []
        assert not gc.isenabled()  # the collector waits for the burst's end too
        t = time.monotonic()
        await asyncio.wait_for(writes.stored(ids), 10 * BURST_S)  # stored at the latest BURST_S into a burst
        waited = time.monotonic() - t
        await asyncio.sleep(2 * QUIET_S)
        assert gc.isenabled()  # given back within a burst longer than BURST_S...
        with burst.post():
            assert gc.isenabled()  # ... and not taken again until that burst ends
        posting = False
        await poster
        await asyncio.sleep(4 * QUIET_S)
        with burst.post():  # a new burst holds it again; its end gives it back
            assert not gc.isenabled()
        await asyncio.sleep(4 * QUIET_S)
        assert gc.isenabled()
        return waited

    assert gc.isenabled()
    waited = asyncio.run(main())
    assert waited < 5 * BURST_S
    assert sorted(started) == sorted(ids) and writes.unfinished() == 0
    assert store.active_ids() == sorted(ids) and store.journal_files() == []
    assert all(store.get(i)["status"] == "queued" for i in ids)
