"""The decode worker: one persistent child process that probes and decodes untrusted video,
and the pipe protocol the caller talks to it with.

Why a process and not a thread: decord can hang inside C code while holding the GIL on files
whose container over-reports frames, so no Python-level timeout in the calling process would
ever fire. A crash of a decoder (segfault) likewise only kills the child. The caller sets a
deadline per job; past it the child is killed (SIGKILL works even when it is stuck in C code)
and a fresh one serves the next job.

Why subprocess + pipes and not multiprocessing: the child is started as a fresh interpreter
(`python -c ...`), so it never re-imports the caller's `__main__` (spawn's footgun in scripts
without a main guard) and never inherits torch/Ray state (fork's footgun).

Protocol on the child's stdin/stdout: a 4-byte little-endian length + a JSON header each way;
when a reply header carries "shape", that many uint8 bytes of frames follow as raw bytes, read
straight into the result array (no extra copy).

The job handler is named by "module:function" (`DEFAULT_HANDLER` decodes with
`sora.video_decode.serve`); it takes the job dict and returns (header, frames or None).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np

DEFAULT_HANDLER = "sora.video_decode:serve"
_LEN = struct.Struct("<I")


class WorkerTimeout(Exception):
    """The job ran past its deadline; the child was killed."""


class WorkerCrash(Exception):
    """The child died during the job; the message says how (e.g. "killed by SIGSEGV")."""


class DecodeWorker:
    """One persistent child process that runs jobs; killed and restarted on a deadline or crash.

    handler: "module:function" the child calls per job. `sys_path` is put in front of the
    child's sys.path so the handler's module is importable (the repository root by default).
    Thread-safe: one job at a time per worker.
    """

    # Starting the child (interpreter + numpy + av + decord imports) is not part of a job's
    # deadline; it has its own generous limit because a loaded machine can be slow to import.
    START_TIMEOUT = 120.0

    def __init__(self, handler: str = DEFAULT_HANDLER, sys_path: list[str] | None = None) -> None:
        assert ":" in handler, f"handler must be 'module:function', got {handler!r}"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.handler = handler
        self.sys_path = list(sys_path) if sys_path is not None else [root]
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid_owner = -1  # the caller pid that started _proc (a forked caller starts its own)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The child's pid, or None when none is running."""
        return self._proc.pid if self._alive() else None

    def _alive(self) -> bool:
        return (self._proc is not None and self._pid_owner == os.getpid()
                and self._proc.poll() is None)

    def _start(self) -> None:
        boot = (f"import sys; sys.path[:0] = {self.sys_path!r}; "
                f"from {__name__} import worker_main; worker_main({self.handler!r})")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, close_fds=True)
        self._pid_owner = os.getpid()
        _grow_pipe(self._proc.stdout.fileno())
        deadline = time.monotonic() + self.START_TIMEOUT
        try:
            hello = json.loads(self._recv_message(deadline))
        except (WorkerTimeout, EOFError) as e:
            self.kill()
            raise RuntimeError(f"video decode worker failed to start: {e!r}") from e
        assert hello.get("ready"), f"unexpected worker greeting {hello}"

    def start(self) -> None:
        """Start the child now if none is running, so that the first job does not wait for an
        interpreter and its imports (e.g. started while a caller loads its models)."""
        with self._lock:
            if not self._alive():
                self.kill()
                self._start()

    def close(self) -> None:
        """Let the child exit on its own (it stops at end of input); kill it if it lingers."""
        proc = self._proc
        if proc is None or self._pid_owner != os.getpid():
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2.0)
        self.kill()

    def forget(self) -> None:
        """In a forked child: drop the parent's worker and lock without touching them."""
        self._lock = threading.Lock()
        self._proc = None

    def kill(self) -> None:
        """Kill the child now (SIGKILL works even when it is stuck in C code holding the GIL)."""
        proc, self._proc = self._proc, None
        if proc is not None and self._pid_owner == os.getpid():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    f.close()

    # -- one job -----------------------------------------------------------------------------

    def run(self, job: dict, timeout: float) -> tuple[dict, np.ndarray | None]:
        """Send `job`, wait at most `timeout` seconds for the reply header and its frames.

        Raises WorkerTimeout (the child was killed) or WorkerCrash (the child died)."""
        assert timeout > 0, f"timeout must be positive, got {timeout}"
        with self._lock:
            if not self._alive():
                self.kill()  # reap a crashed child (no-op if none)
                self._start()
            deadline = time.monotonic() + timeout
            try:
                data = json.dumps(job).encode()
                self._proc.stdin.write(_LEN.pack(len(data)) + data)
                self._proc.stdin.flush()
                header = json.loads(self._recv_message(deadline))
                frames = None
                if "shape" in header:
                    frames = np.empty(header["shape"], dtype=np.uint8)
                    self._recv_into(frames.reshape(-1).data, deadline)  # 1-D view, no copy
                return header, frames
            except WorkerTimeout:
                self.kill()
                raise
            except (EOFError, BrokenPipeError):
                code = self._proc.wait() if self._proc else None
                self.kill()
                raise WorkerCrash(_describe_exit(code)) from None
            except BaseException:
                self.kill()  # e.g. KeyboardInterrupt mid-transfer: the stream is out of sync
                raise

    def _recv_into(self, buf: memoryview, deadline: float) -> None:
        fd = self._proc.stdout.fileno()
        poller = select.poll()  # not select.select: it fails on fds >= 1024 (busy Ray workers)
        poller.register(fd, select.POLLIN)
        pos = 0
        while pos < len(buf):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise WorkerTimeout
            n = os.readv(fd, [buf[pos:]])
            if n == 0:
                raise EOFError
            pos += n

    def _recv_message(self, deadline: float) -> bytes:
        """Read one length-prefixed message."""
        head = bytearray(_LEN.size)
        self._recv_into(memoryview(head), deadline)
        (n,) = _LEN.unpack(head)
        body = bytearray(n)
        self._recv_into(memoryview(body), deadline)
        return bytes(body)


def _grow_pipe(fd: int) -> None:
    """Ask Linux for a 1 MiB pipe buffer (default 64 KiB) so big frame transfers take fewer
    context switches. Best effort: other systems, or a capped limit, keep the default."""
    with contextlib.suppress(Exception):
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


# --------------------------------------------------------------------------------------------
# The child's side
# --------------------------------------------------------------------------------------------


def worker_main(handler: str = DEFAULT_HANDLER) -> None:
    """Entry point of the child: serve jobs from stdin with `handler` until stdin closes."""
    # Keep the protocol stream private: C libraries (FFmpeg, decord) may print to fd 1, which
    # would corrupt the frames. Move our channel to a new fd and point fd 1 at stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    in_fd = sys.stdin.buffer.fileno()
    # each job's frames (135 MB for 49 frames at 720p), freed once sent, stay for the next job
    # instead of coming back from the kernel as fresh pages (`sora.process_memory`)
    from sora.process_memory import keep_model_memory

    keep_model_memory()
    module, name = handler.split(":", 1)
    serve = getattr(importlib.import_module(module), name)

    def send(payload) -> None:
        view = memoryview(payload)  # bytes, or a 1-D uint8 view of the frames
        while view:
            view = view[os.write(out_fd, view):]

    def recv(n: int) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            chunk = os.read(in_fd, n - got)
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def send_header(header: dict) -> None:
        data = json.dumps(header).encode()
        send(_LEN.pack(len(data)) + data)

    send_header({"ready": True})
    while True:
        head = recv(_LEN.size)
        if head is None:
            return  # the caller closed the pipe or exited
        body = recv(_LEN.unpack(head)[0])
        if body is None:
            return
        header, frames = serve(json.loads(body))
        if frames is not None:
            frames = np.ascontiguousarray(frames, dtype=np.uint8)
            header = {**header, "shape": list(frames.shape)}
        send_header(header)
        if frames is not None:
            send(frames.reshape(-1).data)
