"""Connecting to Ray (the cluster at RAY_ADDRESS when set, else a local instance), waiting for
Serve's HTTP proxy, and where Ray's own output goes while a command runs (`RayLog`: a log file,
our progress lines picked out)."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from typing import Callable

# A progress line of our training loops, printed by rank 0: "[train] step 120/3000 | ... loss 0.0831 ..."
PROGRESS_LINE = re.compile(r"^\[(?P<tag>[\w-]+)\] step (?P<step>\d+)(?:/(?P<total>\d+))?(?P<rest>.*)$")
# A warning raised by this project's own code in a worker: "…/sora/x.py:12: UserWarning: …"
OUR_WARNING = re.compile(r"(?:^|/)(?:sora|pipelines|flows)/[\w/]+\.py:\d+: \w*Warning\b")
# A line of Ray's C++ logger, which a driver writes straight to file descriptor 2:
# "[2026-12-06 13:47:03,400 E 7001 7001] core_worker.cc:2465: ..."
NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[DIWEF]) \d+ \d+\] ")

_active: "RayLog | None" = None  # the RayLog in force, if any
_started_by: "RayLog | None" = None  # the RayLog that was active when ensure_ray started Ray


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process. With RAY_ADDRESS set, join that cluster; on a
    node where `ray start` runs a live cluster, join it; otherwise, or with RAY_ADDRESS=local,
    start a private local one without the dashboard (the embedded default). Inside a
    `RayLog`, Ray's output goes to its file."""
    import ray

    global _started_by
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train's print patch sends each print of a training worker both to its stdout and
    # through a logger to its stderr, and the driver shows both streams: every line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    given = os.environ.get("RAY_ADDRESS")
    if given and given != "local":
        ray.init(log_to_driver=True)
    elif not given and (address := running_local_cluster()) is not None:
        ray.init(address=address, log_to_driver=True)  # on a head node: its cluster
    else:
        # a private local instance: no token auth to set up, no dashboard; one node that
        # nothing can preempt, so no preemption-watcher actor polling it
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)  # worker prints (training progress) reach the driver
    _started_by = _active
    if _active is not None:
        _active.attach()


def running_local_cluster(timeout: float = 2.0) -> str | None:
    """The address of the cluster `ray start` runs on this machine (the one a bare `ray.init()`
    would join), or None when there is none or its GCS does not answer. Ray keeps that address
    in TEMP/ray/ray_current_cluster, and a file left by a cluster that is gone (killed, or a
    test's `ray.cluster_utils.Cluster`) makes a bare `ray.init()` retry it forever."""
    import socket

    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        with open(os.path.join(temp, "ray", "ray_current_cluster")) as f:
            address = f.read().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=timeout):
            return address
    except (OSError, ValueError):
        return None


def node_id() -> str | None:
    """The id of the Ray node this process runs on (hex; None where Ray is not started): stages
    record it beside their results so a run shows which node did which work."""
    ray = sys.modules.get("ray")  # not imported: not started either
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


def in_actor() -> bool:
    """Whether this process is a Ray actor's (a stage's pool member, a Serve replica): a process
    that exists for that work and ends with it."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def has_gpus() -> bool:
    """Whether the Ray cluster has GPUs (stages then ask for `num_gpus`)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def wait_for_serve_proxy(host: str, port: int, timeout_s: float) -> None:
    """Block until Serve's HTTP proxy on host:port answers its health route; TimeoutError after
    `timeout_s`. A wildcard host is probed on the loopback address."""
    import urllib.error
    import urllib.request

    probe = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    url = f"http://{'[' + probe + ']' if ':' in probe else probe}:{int(port)}/-/healthz"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5.0):
                return
        except urllib.error.HTTPError:  # it answers (503 while draining): the proxy is there
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Serve's HTTP proxy did not answer on {host}:{port} in {timeout_s:.0f} s: {e}")
        time.sleep(0.5)


def table_blocks(table, batch_size: int, max_blocks: int = 256) -> list:
    """Cut a pyarrow table into about batch-sized slices (at most `max_blocks`) for
    `ray.data.from_arrow(list)`: one table is ONE block, which one actor of a pool takes whole
    (the rest idle, and progress moves only at the end). Cut on the driver because a
    `repartition` task waits forever for a CPU when the actor pool holds them all."""
    n = table.num_rows
    blocks = max(1, min(-(-n // max(1, batch_size)), max_blocks))
    step = max(1, -(-n // blocks))
    return [table.slice(i, step) for i in range(0, n, step)] or [table]


def table_dataset(table, batch_size: int, max_blocks: int = 256):
    """A Ray dataset of `table_blocks(table, batch_size, max_blocks)`, made on the driver.
    `ray.data.from_arrow` runs a task per block to read its metadata, which waits for worker
    processes to start and import Ray Data (seconds, on every run of a command);
    `ray.data.from_blocks` reads it here."""
    import ray

    return ray.data.from_blocks(table_blocks(table, batch_size, max_blocks))


class RayLog:
    """While active, Ray's own output goes to the file at `path` instead of the terminal:
    the lines Ray forwards from workers and actors (stdout/stderr), the `ray`/`ray.data`
    loggers of this process, Ray's Python warnings, the C++ core worker's lines on file
    descriptor 2, and Ray Data's progress bars (off). A worker line that is a progress line
    of ours (`PROGRESS_LINE`) is handed to `on_progress(tag, step, total, rest)`; a warning
    of our own code from a worker is still printed. `verbose` prints everything as well.

        with RayLog("out/logs/ray.log", on_progress=show):
            ensure_ray(); ...

    Leaving it shuts down the Ray that `ensure_ray` started inside it (so its last lines
    land in the file too) and puts everything back."""

    def __init__(self, path: str, *, verbose: bool = False,
                 on_progress: Callable[[str, int, int | None, str], None] | None = None):
        self.path, self.verbose, self.on_progress = os.path.abspath(path), verbose, on_progress
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []
        self._worker_handler_installed = False

    # ------------------------------------------------------------------ in and out
    def __enter__(self) -> "RayLog":
        global _active
        import ray  # noqa: F401 - sets up the `ray` logger this routes
        import ray.data  # noqa: F401 - and `ray.data`'s

        assert _active is None, "a RayLog is already active"
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
        self._undo.append(self.file.close)
        self.handler = logging.StreamHandler(self.file)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)  # Ray Data's loggers pass DEBUG records (its scheduler's every step)
        self._route_loggers()
        self._route_warnings()
        self._data_progress_bars_off()
        if not self.verbose:
            self._native = _NativeStderrFilter(self.path)
            self._native.start()
            self._undo.append(self._native.stop)
        _active = self
        self._undo.append(self._deactivate)
        if ray.is_initialized():
            self.attach()
        return self

    def __exit__(self, *exc) -> None:
        global _started_by
        import ray

        if _started_by is self and ray.is_initialized():
            ray.shutdown()  # inside, so its closing lines still go to the file
            _started_by = None
        while self._undo:
            self._undo.pop()()

    def _deactivate(self) -> None:
        global _active
        _active = None

    def attach(self) -> None:
        """After `ray.init`: take over the driver's printing of worker lines (Ray has no public
        hook for it: this swaps the handler `ray.init(log_to_driver=True)` registered)."""
        self._route_loggers()  # ray.init may have added handlers
        if self._worker_handler_installed:
            return
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # a Ray without it: its own printing stays
            return
        with dispatcher._lock:
            named = [(i, h) for i, (name, h) in enumerate(dispatcher.handlers) if name == "ray_print_logs"]
            if not named:
                return  # log_to_driver=False: nothing is forwarded
            i, ray_print = named[0]
            self._ray_print = ray_print
            dispatcher.handlers[i] = ("ray_print_logs", self._worker_lines)
        self._worker_handler_installed = True

        def restore() -> None:
            with dispatcher._lock:
                dispatcher.handlers = [("ray_print_logs", self._ray_print) if h is self._worker_lines else (n, h)
                                       for n, h in dispatcher.handlers]

        self._undo.append(restore)

    # ------------------------------------------------------------------ routes
    def write(self, text: str) -> None:
        with self._lock:
            if not self.file.closed:
                self.file.write(text if text.endswith("\n") else text + "\n")

    def _worker_lines(self, data: dict) -> None:
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}) "
        for line in data.get("lines", []):
            if RAY_TQDM_MAGIC in line:
                continue  # a distributed progress bar's state, for Ray's own display
            self.write(prefix + line)
            m = PROGRESS_LINE.match(line)
            if m and self.on_progress is not None:
                total = int(m["total"]) if m["total"] else None
                self.on_progress(m["tag"], int(m["step"]), total, m["rest"])
            elif OUR_WARNING.search(line) and not self.verbose:
                print(prefix + line, file=sys.stderr, flush=True)
        if self.verbose:
            self._ray_print(data)

    def _route_loggers(self) -> None:
        """The file gets every record of `ray` and its non-propagating children; their
        console handlers print only with `verbose`."""
        names = ["ray"] + [n for n, lg in logging.Logger.manager.loggerDict.items()
                           if n.startswith("ray.") and isinstance(lg, logging.Logger) and not lg.propagate]
        for name in names:
            logger = logging.getLogger(name)
            if self.handler not in logger.handlers:
                logger.addHandler(self.handler)
                self._undo.append(lambda lg=logger: lg.removeHandler(self.handler))
            for h in logger.handlers:
                if (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                        and h is not self.handler and self._gate not in h.filters):
                    h.addFilter(self._gate)
                    self._undo.append(lambda h=h: h.removeFilter(self._gate))

    def _gate(self, record: logging.LogRecord) -> bool:
        return self.verbose

    def _route_warnings(self) -> None:
        import warnings

        import ray

        ray_dir = os.path.dirname(ray.__file__) + os.sep
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if str(filename).startswith(ray_dir):
                self.write(warnings.formatwarning(message, category, filename, lineno, line))
                if not self.verbose:
                    return
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning

        def restore() -> None:
            warnings.showwarning = shown

        self._undo.append(restore)

    def _data_progress_bars_off(self) -> None:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        before = ctx.enable_progress_bars
        ctx.enable_progress_bars = False

        def restore() -> None:
            ctx.enable_progress_bars = before

        self._undo.append(restore)


class _NativeStderrFilter:
    """Puts a pipe on file descriptor 2 and a thread behind it that appends Ray's C++ log lines
    (`NATIVE_LINE`) to the log file and passes every other byte on to the real stderr at once
    (Python's own stderr writes, tracebacks, other libraries). Fatal native lines are passed on
    too. `stop` waits until the pipe is drained, then gives descriptor 2 back."""

    SYNC = b"\x00sora-stderr-sync\n"

    def __init__(self, path: str):
        self.path = path

    def start(self) -> None:
        sys.stderr.flush()
        self.log = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.synced = threading.Event()
        self.to_log = True
        threading.Thread(target=self._pump, args=(read,), name="sora-native-stderr", daemon=True).start()

    def stop(self) -> None:
        sys.stderr.flush()
        os.write(2, self.SYNC)
        self.synced.wait(timeout=5.0)
        os.dup2(self.real, 2)
        # processes started meanwhile may still hold the pipe: their lines keep flowing, to the terminal
        self.to_log = False

    def _pump(self, read: int) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(read, 65536)
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._route(line + b"\n")
            if pending and not pending.startswith(b"["):
                # a partial line that cannot be a native log line (a progress line redrawn
                # with "\r", a prompt): out now rather than at its newline
                self._out(self.real, pending)
                pending = b""

    def _route(self, line: bytes) -> None:
        if line == self.SYNC:
            self.synced.set()
            return
        m = NATIVE_LINE.match(line)
        if m and self.to_log:
            self._out(self.log, line)
            if m["level"] != b"F":
                return
        self._out(self.real, line)

    @staticmethod
    def _out(fd: int, data: bytes) -> None:
        try:
            os.write(fd, data)
        except OSError:
            pass
