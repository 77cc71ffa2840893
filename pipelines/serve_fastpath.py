"""The ingress's hot routes without FastAPI's per-request machinery, and its own HTTP server.

`FastPath` is an ASGI middleware on the ingress's FastAPI app. The two requests a polling
client makes over and over - POST /v1/videos and GET /v1/videos/{id} - skip FastAPI's routing,
dependency resolution and exception middleware: it calls the same route methods of the ingress
(`VideoAPI.create`, `VideoAPI.retrieve`) with a Starlette `Request` and turns an `APIError` or
an unexpected exception into the same response the app's exception handlers give. So auth,
limits, validation, the journal's group commit, error bodies and headers are one code path
whichever way a request comes. Every other request (other routes and methods, HEAD, a
trailing slash, a websocket) goes to FastAPI unchanged. `ServeConfig.fast_path=False` sends
everything to FastAPI.

`start_http_server` runs uvicorn (httptools parser) inside the ingress replica, on the
replica's own event loop, serving the same app on `ServeConfig.http_port`: clients reach the
ingress without Serve's proxy hop and without Serve's per-request wrapping. Serve still starts,
health-checks and restarts that replica and scales the generators; the port lives and dies
with the replica (one ingress replica: one host:port).
"""

import asyncio
import logging
import socket
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.routing import get_route_path

from pipelines.video_jobs import json_bytes
from pipelines.video_requests import APIError

logger = logging.getLogger("ray.serve")

PREFIX = "/v1/videos/"
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # where a server on all interfaces answers itself
SERVER_ERROR = {"error": {"message": "internal server error", "type": "server_error", "param": None, "code": None}}


class FastJSONResponse(JSONResponse):
    """A JSONResponse rendered by orjson (`video_jobs.json_bytes`): the same compact UTF-8 JSON for
    the API's video objects in a fraction of the time (the answer to every POST and poll)."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def _owner() -> Any:
    """The ingress instance of this replica (what Serve's class-based FastAPI routes call)."""
    from ray import serve

    return serve.get_replica_context().servable_object


class FastPath:
    """ASGI middleware: answers POST /v1/videos and GET /v1/videos/{id} by calling the ingress's
    route methods directly; passes everything else to ``app``."""

    def __init__(self, app, owner=_owner):
        self.app = app
        self._owner_of = owner
        self._owner = None

    def _route(self, scope) -> tuple[str, str | None] | None:
        if scope["type"] != "http":
            return None
        method = scope["method"]
        if method != "POST" and method != "GET":
            return None
        path = get_route_path(scope)
        if method == "POST":
            return ("create", None) if path == "/v1/videos" else None
        if path.startswith(PREFIX) and len(path) > len(PREFIX) and "/" not in path[len(PREFIX):]:
            return "retrieve", path[len(PREFIX):]
        return None

    async def __call__(self, scope, receive, send) -> None:
        route = self._route(scope)
        owner = self._owner
        if route is not None and owner is None:
            owner = self._owner = self._owner_of()
        if route is None or owner is None or not owner.cfg.fast_path:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            if route[0] == "create":
                response = await owner.create(request)
            else:
                response = await owner.retrieve(route[1], request)
        except APIError as e:
            response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the app's handler for Exception answers the same
            logger.exception("unexpected error on %s %s", request.method, request.url.path)
            response = JSONResponse(SERVER_ERROR, status_code=500)
        await response(scope, receive, send)


def start_http_server(app, host: str, port: int, max_ongoing: int | None = None,
                      backlog: int = 2048) -> tuple[Any, asyncio.Task]:
    """Serve ``app`` on host:port from the running event loop (uvicorn, httptools) -> (the uvicorn
    Server, its task); ``server.should_exit = True`` stops it. Beyond ``max_ongoing`` connections
    and requests at once uvicorn answers 503. Raises OSError when the port is taken."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"the ingress cannot listen on {host}:{port} ({e.strerror}); pick a free http_port") from e
    # proxy_headers off: the API never reads the client's address, and uvicorn's X-Forwarded-*
    # middleware would otherwise wrap every request
    config = uvicorn.Config(app, host=host, port=port, http="httptools", lifespan="off", access_log=False,
                            log_config=None, backlog=backlog, timeout_keep_alive=30,
                            limit_concurrency=max_ongoing, proxy_headers=False)
    server = uvicorn.Server(config)
    return server, asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))


async def warm_http(server, host: str, port: int, path: str, headers: dict[str, str] | None = None,
                    timeout_s: float = 30.0) -> int:
    """GET ``path`` from the ``server`` `start_http_server` started, over a real connection, once
    it listens -> the status (a first request through uvicorn, httptools and the app's route)."""
    async def get() -> int:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(LOOPBACK.get(host, host), port)
        try:
            head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            writer.write(f"GET {path} HTTP/1.1\r\nhost: {host}\r\n{head}connection: close\r\n\r\n".encode())
            status = int((await reader.readline()).split()[1])
            await reader.read()  # the rest, until the server closes
            return status
        finally:
            writer.close()

    return await asyncio.wait_for(get(), timeout_s)
