"""Video I/O: probe, decode (decord), resize, and write (PyAV, pillow).

Everything that reads an untrusted file goes through one persistent child process (the
"decode worker") that the caller kills when a deadline passes. Why a process and not a thread:
decord can hang inside C code while holding the GIL on files whose container over-reports frames
(see docs/setup-notes.md), so no Python-level timeout in the calling process would ever fire. A crash of the
decoder (segfault) likewise only kills the child. Both become a `VideoError`.

Shapes: frames are `(T, H, W, 3)` uint8 RGB. Sizes are given as `(width, height)` like PIL.

Writers are plain functions that run in the caller (encoding our own arrays is trusted work).
Every function accepts a local path or any fsspec URL (`memory://`, `file://`, `s3://` ...);
remote inputs are copied to a local temp file first because decord and PyAV need a real file.
"""

from __future__ import annotations

import atexit
import contextlib
import fractions
import io
import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

# FOOTGUN: import av before decord, in every process. decord bundles an older FFmpeg and libvpx;
# if it is loaded first, PyAV's libvpx-vp9 encoder binds to decord's symbols and fails to open
# ("avcodec_open2(libvpx-vp9) returned 22"). Importing av here, at the top, makes `import
# sora.video_io` enough; the decode worker imports av before decord for the same reason.
import av  # noqa: E402  (order matters, see above)

__all__ = [
    "VideoError",
    "VideoInfo",
    "probe",
    "read_frames",
    "resize_frames",
    "cover_crop_box",
    "write_video",
    "write_gif",
    "write_webp",
    "DEFAULT_CODECS",
]


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


class VideoError(Exception):
    """The one error for any input that cannot be read as a video: empty, not a video,
    corrupt, truncated, a decoder crash, or a decode that ran past its deadline.

    `source` is the URI the caller passed; `reason` is a short human-readable sentence that is
    safe to store in a quarantine table.
    """

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = str(source)
        self.reason = reason

    def __reduce__(self):  # keep both fields when pickled across processes (Ray)
        return (type(self), (self.source, self.reason))


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns about a video without decoding its frames.

    `num_frames` is the count decord will index (`read_frames` accepts `0..num_frames-1`);
    on a truncated file it may over-report, and reading the missing frames raises VideoError.
    `codec` is the FFmpeg codec name ("h264", "vp9", "mpeg4", "mjpeg", ...); `container` is a
    short format name ("mp4", "mov", "webm", "matroska", "avi", ...).
    """

    width: int
    height: int
    fps: float
    num_frames: int
    duration: float  # seconds, num_frames / fps
    codec: str
    container: str

    @property
    def aspect(self) -> float:
        """width / height (e.g. 1.777... for 16:9)."""
        return self.width / self.height


# --------------------------------------------------------------------------------------------
# fsspec helpers: decord and PyAV need a real local file
# --------------------------------------------------------------------------------------------


def _local_path(uri: str) -> str | None:
    """The local filesystem path for `uri`, or None when it must be fetched through fsspec."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return uri
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None


def _suffix(uri: str) -> str:
    """The file extension of `uri` including the dot (".mp4"), lowercased; "" if none."""
    name = uri.rsplit("/", 1)[-1]
    return os.path.splitext(name)[1].lower()


@contextlib.contextmanager
def _fetched(uri: str) -> Iterator[str]:
    """Yield a local path with the bytes of `uri`; a temp copy for remote URLs, removed after."""
    local = _local_path(uri)
    if local is not None:
        yield local
        return
    import fsspec

    fd, tmp = tempfile.mkstemp(prefix="sora-video-", suffix=_suffix(uri))
    try:
        with os.fdopen(fd, "wb") as dst, fsspec.open(uri, "rb") as src:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def _upload_target(uri: str) -> Iterator[str]:
    """Yield a local path to write to; for remote URLs it is uploaded to `uri` on success."""
    local = _local_path(uri)
    if local is not None:
        parent = os.path.dirname(os.path.abspath(local))
        os.makedirs(parent, exist_ok=True)
        yield local
        return
    import fsspec

    fd, tmp = tempfile.mkstemp(prefix="sora-video-", suffix=_suffix(uri))
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as src, fsspec.open(uri, "wb") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------
# Resizing that keeps the aspect ratio
# --------------------------------------------------------------------------------------------


def cover_crop_box(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[float, float, float, float]:
    """The centred box (x0, y0, x1, y1) of a src_w x src_h image that has the aspect of
    dst_w x dst_h and is as large as possible.

    Scaling that box to dst_w x dst_h equals "scale to cover, then centre-crop the excess", so
    objects keep their shape (a circle stays a circle). The box is fractional on purpose: PIL
    resamples a fractional box exactly, so there is no rounding drift in the aspect.
    """
    assert min(src_w, src_h, dst_w, dst_h) > 0, f"sizes must be positive: {src_w, src_h, dst_w, dst_h}"
    # Compare aspects in integers to decide which side is cropped.
    if src_w * dst_h > dst_w * src_h:  # source is wider: crop left and right
        crop_w, crop_h = src_h * dst_w / dst_h, float(src_h)
    else:  # source is taller (or equal): crop top and bottom
        crop_w, crop_h = float(src_w), src_w * dst_h / dst_w
    x0, y0 = (src_w - crop_w) / 2, (src_h - crop_h) / 2
    return (x0, y0, x0 + crop_w, y0 + crop_h)


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize (T, H, W, 3) uint8 frames to (T, height, width, 3) keeping the aspect ratio.

    Scale to cover the target, centre-crop the excess (see `cover_crop_box`). Uses PIL's
    antialiased bicubic filter, whose kernel widens when shrinking, so downscaling does not alias.
    """
    from PIL import Image

    frames = _check_frames(frames)
    T, H, W, _ = frames.shape
    if (W, H) == (width, height):
        return frames
    box = cover_crop_box(W, H, width, height)
    out = np.empty((T, height, width, 3), dtype=np.uint8)
    for t in range(T):
        img = Image.fromarray(frames[t])
        out[t] = np.asarray(img.resize((width, height), Image.Resampling.BICUBIC, box=box))
    return out


# --------------------------------------------------------------------------------------------
# Reading: public API (runs in the caller, talks to the decode worker)
# --------------------------------------------------------------------------------------------


def probe(uri: str, timeout: float = 20.0, *, _simulate_hang_seconds: float = 0.0,
          _simulate_crash: bool = False) -> VideoInfo:
    """Open `uri` (local path or fsspec URL) and describe its first video stream.

    Raises VideoError for anything that is not a readable video, or when opening takes longer
    than `timeout` seconds (the decode process is killed). Fetching a remote URL to a temp file
    is not counted in `timeout`. The `_simulate_*` arguments are test hooks: the worker sleeps
    (as a hung decoder would) or kills itself with SIGSEGV before doing the work.
    """
    job = {"op": "probe", "hang": float(_simulate_hang_seconds), "crash": bool(_simulate_crash)}
    header, _ = _run_job(uri, job, timeout)
    return VideoInfo(**header["info"])


def read_frames(
    uri: str,
    indices: Sequence[int] | None = None,
    *,
    size: tuple[int, int] | None = None,
    timeout: float = 60.0,
    _simulate_hang_seconds: float = 0.0,
    _simulate_crash: bool = False,
) -> np.ndarray:
    """Decode frames of `uri` with decord. Returns (T, H, W, 3) uint8 RGB.

    indices: frame numbers in `0..num_frames-1` (any order, repeats allowed); None = all frames.
    size: (width, height) of the output; frames are resized keeping their aspect ratio (cover,
        then centre-crop, see `resize_frames`). None keeps the stored size.
    timeout: seconds for opening + decoding + transfer; past it the decode process is killed
        and VideoError is raised.
    Raises VideoError for unreadable input, including frames missing from a truncated file
    (never returns made-up frames), and IndexError for an index outside the video.
    """
    if size is not None:
        assert len(size) == 2 and min(size) > 0, f"size must be (width, height) > 0, got {size}"
    job = {
        "op": "read",
        "indices": None if indices is None else [int(i) for i in indices],
        "size": None if size is None else [int(size[0]), int(size[1])],
        "hang": float(_simulate_hang_seconds),
        "crash": bool(_simulate_crash),
    }
    header, frames = _run_job(uri, job, timeout)
    assert frames is not None and frames.shape == tuple(header["shape"]), "worker sent no frames"
    return frames


def _run_job(uri: str, job: dict, timeout: float) -> tuple[dict, np.ndarray | None]:
    """Fetch `uri` if remote, check the obvious, then run `job` in the decode worker."""
    uri = os.fspath(uri)
    assert timeout > 0, f"timeout must be positive, got {timeout}"
    try:
        with _fetched(uri) as path:
            if not os.path.isfile(path):
                raise VideoError(uri, "no such file")
            if os.path.getsize(path) == 0:
                raise VideoError(uri, "empty file (0 bytes)")
            job["path"] = os.path.abspath(path)
            header, frames = _WORKER.run(job, timeout, uri)
    except FileNotFoundError as e:  # fsspec: remote object missing
        raise VideoError(uri, f"no such file ({e})") from None
    if header.get("error") == "index":
        raise IndexError(f"{uri}: {header['reason']}")
    if header.get("error"):
        raise VideoError(uri, header["reason"])
    return header, frames


class _DecodeWorker:
    """One persistent child process that probes and decodes; killed and restarted on a
    deadline or crash.

    Why subprocess + pipes and not multiprocessing: the child is started as a fresh interpreter
    (`python -c ...`), so it never re-imports the caller's `__main__` (spawn's footgun in
    scripts without a main guard) and never inherits torch/Ray state (fork's footgun).
    Protocol on the child's stdin/stdout: a 4-byte length + JSON header each way; frames follow
    a reply header as raw bytes, read straight into the result array (no extra copy).
    """

    # Starting the child (interpreter + numpy + av + decord imports) is not part of a call's
    # deadline; it has its own generous limit because a loaded machine can be slow to import.
    START_TIMEOUT = 120.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid_owner = -1  # the caller pid that started _proc (a forked caller starts its own)

    # -- lifecycle ---------------------------------------------------------------------------

    def _alive(self) -> bool:
        return (self._proc is not None and self._pid_owner == os.getpid()
                and self._proc.poll() is None)

    def _start(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        boot = (f"import sys; sys.path.insert(0, {root!r}); "
                f"from {__name__} import _worker_main; _worker_main()")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, close_fds=True)
        self._pid_owner = os.getpid()
        _grow_pipe(self._proc.stdout.fileno())
        deadline = time.monotonic() + self.START_TIMEOUT
        try:
            hello = json.loads(self._recv_message(deadline))
        except (TimeoutError, EOFError) as e:
            self.kill()
            raise RuntimeError(f"video decode worker failed to start: {e}") from e
        assert hello.get("ready"), f"unexpected worker greeting {hello}"

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

    # -- one call ----------------------------------------------------------------------------

    def run(self, job: dict, timeout: float, uri: str) -> tuple[dict, np.ndarray | None]:
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
            except TimeoutError:
                self.kill()
                raise VideoError(uri, f"decode timed out after {timeout:.1f} s") from None
            except (EOFError, BrokenPipeError):
                code = self._proc.wait() if self._proc else None
                self.kill()
                raise VideoError(uri, f"decoder crashed ({_describe_exit(code)})") from None
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
                raise TimeoutError
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


_LEN = struct.Struct("<I")
_WORKER = _DecodeWorker()
atexit.register(_WORKER.close)
os.register_at_fork(after_in_child=_WORKER.forget)  # a fork mid-call would inherit a held lock


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
# Reading: the decode worker (runs in the child process)
# --------------------------------------------------------------------------------------------


class _Reject(Exception):
    """Raised inside the worker for an input that is not a readable video; carries the reason."""


_IMAGE_DEMUXERS = ("image2", "_pipe")  # FFmpeg opens a single PNG/JPEG as a 1-frame "video"


def _container_name(fmt: str, path: str, metadata: dict) -> str:
    """A short container name from FFmpeg's demuxer name (which lumps mp4/mov, mkv/webm)."""
    if fmt.startswith("mov,mp4"):
        return "mov" if metadata.get("major_brand", "").strip() == "qt" else "mp4"
    if fmt.startswith("matroska"):
        with open(path, "rb") as f:  # the EBML header names its DocType in the first bytes
            return "webm" if b"webm" in f.read(64) else "matroska"
    return fmt.split(",")[0]


def _inspect(path: str) -> dict:
    """What PyAV sees: container, codec, declared frame count. Raises _Reject."""
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        with open(path, "rb") as f:
            head = f.read(12)
        if head[4:8] == b"ftyp":  # an ISO-BMFF file whose index (moov) never got written
            raise _Reject("truncated or incomplete mp4/mov: no index (moov atom) found; "
                          "the file was probably cut off while being written") from None
        raise _Reject(f"not a video: unrecognised or corrupt container ({e.strerror or e})") from None
    with container:
        fmt = container.format.name
        if not container.streams.video:
            others = [f"{len(s)} {kind}" for kind, s in
                      (("audio", container.streams.audio), ("subtitle", container.streams.subtitles))
                      if len(s)]
            found = f" (found {', '.join(others)} stream(s))" if others else ""
            raise _Reject(f"not a video: no video stream{found}")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        if any(tag in fmt for tag in _IMAGE_DEMUXERS):
            raise _Reject(f"not a video: a still image ({codec})")
        return {"container": _container_name(fmt, path, dict(container.metadata)),
                "codec": codec, "declared_frames": int(stream.frames or 0),
                "width": int(stream.codec_context.width), "height": int(stream.codec_context.height)}


def _count_packets(path: str) -> int:
    """Video packets actually present in the file (demux only, no decode)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def _short(e: Exception) -> str:
    """decord errors carry a C++ location and stack; keep the last meaningful line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "Stack trace" not in ln]
    text = lines[0] if lines else type(e).__name__
    return text.split("] ", 1)[-1][:200]


def _open_decord(path: str, seen: dict):
    import decord

    try:
        reader = decord.VideoReader(path)
    except Exception as e:  # DECORDError or RuntimeError, depending on where decord fails
        try:
            present = _count_packets(path)
        except Exception:
            present = -1
        declared = seen["declared_frames"]
        if 0 <= present < declared:
            raise _Reject(f"truncated: container lists {declared} frames but only "
                          f"{present} are present") from None
        raise _Reject(f"corrupt video: decord cannot open it ({_short(e)})") from None
    if len(reader) <= 0:
        raise _Reject("not a video: the video stream has no frames")
    return reader


def _probe_local(path: str) -> tuple[dict, object]:
    seen = _inspect(path)
    reader = _open_decord(path, seen)
    fps = float(reader.get_avg_fps())
    n = len(reader)
    if not fps > 0:
        raise _Reject(f"corrupt video: frame rate is {fps}")
    info = {"width": seen["width"], "height": seen["height"], "fps": fps, "num_frames": n,
            "duration": n / fps, "codec": seen["codec"], "container": seen["container"]}
    return info, reader


def _decode(reader, indices: list[int] | None, info: dict) -> np.ndarray:
    """(T, H, W, 3) uint8 for `indices`; raises _Reject naming the first frame that fails."""
    n, width, height = info["num_frames"], info["width"], info["height"]
    indices = list(range(n)) if indices is None else indices
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise IndexError(f"frame index {bad[0]} out of range for a video of {n} frames")
    if not indices:
        return np.empty((0, height, width, 3), dtype=np.uint8)
    try:
        frames = reader.get_batch(indices).asnumpy()
    except Exception as e:
        if "DECORDArrayCopyFromTo" in str(e):
            return _decode_padded_rows(reader, indices, width, height)
    else:
        if frames.shape != (len(indices), height, width, 3):  # never hand back misshapen data
            raise _Reject(f"corrupt video: decoded frames of shape {frames.shape[1:]} but the "
                          f"stream says {width}x{height}")
        return frames
    # Find the first failing frame to say where the file breaks (error path only).
    for i in sorted(set(indices)):
        try:
            reader[i].asnumpy()
        except Exception:
            raise _Reject(f"truncated or corrupt: frame {i} of {n} could not be decoded") from None
    raise _Reject("corrupt video: decord failed to decode the batch")


def _decode_padded_rows(reader, indices: list[int], width: int, height: int) -> np.ndarray:
    """Work around a decord 0.6.0 bug. For a few small widths (8, 12, 16, 24, 48, 72 px; we
    scanned 8..3840) FFmpeg pads each RGB row to an aligned length and decord reports the padded
    buffer as (H, W, linesize / W) instead of (H, W, 3); `get_batch` then fails with
    "DECORDArrayCopyFromTo: The size must exactly match". Single frames still come out, so we
    cut the real W * 3 bytes out of each padded row: exact pixels, no resampling.
    """
    out = np.empty((len(indices), height, width, 3), dtype=np.uint8)
    for t, i in enumerate(indices):
        try:
            raw = reader[i].asnumpy()
        except Exception:
            raise _Reject(f"truncated or corrupt: frame {i} of {len(reader)} could not be "
                          "decoded") from None
        rows = raw.reshape(height, -1)  # (H, linesize): one padded row of bytes per image row
        assert rows.shape[1] >= width * 3, f"decord row of {rows.shape[1]} bytes < {width} px"
        out[t] = rows[:, : width * 3].reshape(height, width, 3)
    return out


def _serve_one(job: dict) -> tuple[dict, np.ndarray | None]:
    if job.get("hang"):
        time.sleep(job["hang"])  # test hook: behave like a decoder stuck in C code
    if job.get("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)  # test hook: behave like a decoder segfault
    try:
        info, reader = _probe_local(job["path"])
        if job["op"] == "probe":
            return {"info": info}, None
        frames = _decode(reader, job["indices"], info)
        if job["size"] is not None:
            w, h = job["size"]
            frames = resize_frames(frames, w, h) if len(frames) else np.empty((0, h, w, 3), np.uint8)
        return {"shape": list(frames.shape)}, np.ascontiguousarray(frames)
    except _Reject as e:
        return {"error": "video", "reason": str(e)}, None
    except IndexError as e:
        return {"error": "index", "reason": str(e)}, None
    except Exception as e:  # anything else a hostile file provokes is still the file's fault
        return {"error": "video", "reason": f"decoder error: {type(e).__name__}: {_short(e)}"}, None


def _worker_main() -> None:
    """Entry point of the decode worker: serve jobs from stdin until it closes."""
    # Keep the protocol stream private: C libraries (FFmpeg, decord) may print to fd 1, which
    # would corrupt the frames. Move our channel to a new fd and point fd 1 at stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    in_fd = sys.stdin.buffer.fileno()
    import decord  # noqa: F401  (after av, see the FOOTGUN note at the top)

    def send(payload: bytes) -> None:
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
        header, frames = _serve_one(json.loads(body))
        send_header(header)
        if frames is not None:
            send(frames.reshape(-1).data)


# --------------------------------------------------------------------------------------------
# Writers (PyAV, pillow)
# --------------------------------------------------------------------------------------------

# File extension -> FFmpeg muxer name.
_FORMAT_BY_EXT = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska",
                  ".webm": "webm", ".avi": "avi"}
# Muxer -> the codec `write_video` uses when none is given (webm only allows VP8/VP9/AV1).
DEFAULT_CODECS = {"mp4": "h264", "mov": "h264", "matroska": "h264", "webm": "libvpx-vp9",
                  "avi": "mpeg4"}


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    assert frames.ndim == 4 and frames.shape[-1] == 3, \
        f"frames must be (T, H, W, 3) RGB, got shape {frames.shape}"
    assert frames.dtype == np.uint8, f"frames must be uint8, got {frames.dtype}"
    assert frames.shape[0] >= 1, "need at least one frame"
    return np.ascontiguousarray(frames)


def _encoder_options(codec: str, crf: int) -> tuple[str, dict[str, str]]:
    """(pixel format, encoder options) for `codec` at quality `crf` (lower = better)."""
    if codec in ("h264", "libx264"):
        return "yuv420p", {"crf": str(crf), "preset": "medium"}
    if codec in ("libvpx-vp9", "vp9"):
        # crf with b:v 0 is VP9's constant-quality mode; row-mt off keeps bytes deterministic.
        return "yuv420p", {"crf": str(crf), "b:v": "0", "row-mt": "0", "cpu-used": "4",
                           "deadline": "good"}
    if codec in ("mpeg4", "mjpeg"):
        # These have no crf; qscale ~ crf / 6 maps x264's "visually lossless" crf 18 to
        # qscale 3, which is near-transparent for MPEG-4 part 2 and MJPEG too.
        qscale = int(np.clip(round(crf / 6), 1, 31))
        return ("yuvj420p" if codec == "mjpeg" else "yuv420p"), {"qscale": str(qscale)}
    return "yuv420p", {}


def write_video(
    uri: str,
    frames: np.ndarray,
    fps: float,
    *,
    codec: str | None = None,
    crf: int = 18,
    container: str | None = None,
) -> None:
    """Encode `frames` (T, H, W, 3) uint8 RGB at `fps` to `uri` (local path or fsspec URL).

    The container comes from `container` or the file extension (.mp4 .mov .mkv .webm .avi);
    the codec defaults per container: H.264 for mp4/mov/mkv, VP9 ("libvpx-vp9") for webm,
    MPEG-4 part 2 ("mpeg4") for avi. Any other FFmpeg encoder name works too, e.g. "mjpeg".
    All codecs write 4:2:0 chroma, so width and height must be even: we raise ValueError
    rather than pad, because silent padding would change the size the caller asked for.
    Output is deterministic: the same frames give the same bytes (one encoder thread,
    `fflags=+bitexact` so no encoder version string or random segment id is written).
    """
    frames = _check_frames(frames)
    T, H, W, _ = frames.shape
    fmt = container or _FORMAT_BY_EXT.get(_suffix(uri))
    if fmt is None:
        raise ValueError(f"cannot tell the container of {uri!r}; pass container='mp4' (or another)")
    codec = codec or DEFAULT_CODECS.get(fmt, "h264")
    if W % 2 or H % 2:
        raise ValueError(
            f"{codec} with 4:2:0 chroma needs even width and height, got {W}x{H}; "
            "crop or pad the frames to even sides first")
    assert fps > 0, f"fps must be positive, got {fps}"
    pix_fmt, options = _encoder_options(codec, crf)
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with _upload_target(uri) as path:
        # faststart puts the index (moov) first so players (and our HTTP endpoint) can stream.
        mux_options = {"fflags": "+bitexact"}
        if fmt in ("mp4", "mov"):
            mux_options["movflags"] = "+faststart"
        with av.open(path, "w", format=fmt, options=mux_options) as out:
            stream = out.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
            stream.thread_count = 1  # multi-threaded encoders are not bit-exact run to run
            stream.codec_context.time_base = 1 / rate
            stream.options = options
            try:
                for t in range(T):
                    frame = av.VideoFrame.from_ndarray(frames[t], format="rgb24")
                    frame = frame.reformat(format=pix_fmt)
                    frame.pts = t
                    out.mux(stream.encode(frame))
                out.mux(stream.encode(None))  # flush delayed frames (B-frames, lookahead)
            except av.error.FFmpegError as e:
                if "vpx" in codec and "decord" in sys.modules:
                    raise RuntimeError(
                        f"{codec} failed to open ({e}); decord was imported before av in this "
                        "process and its bundled libvpx clashes: import sora.video_io first") from e
                raise


def _write_pillow(uri: str, frames: np.ndarray, fps: float, fmt: str, **kwargs) -> None:
    from PIL import Image

    frames = _check_frames(frames)
    assert fps > 0, f"fps must be positive, got {fps}"
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format=fmt, save_all=True, append_images=images[1:],
                   duration=int(round(1000 / fps)), loop=0, **kwargs)
    with _upload_target(uri) as path, open(path, "wb") as f:
        f.write(buf.getvalue())


def write_gif(uri: str, frames: np.ndarray, fps: float) -> None:
    """Animated GIF preview of `frames` (T, H, W, 3) uint8 (256-colour palette per frame)."""
    _write_pillow(uri, frames, fps, "GIF", optimize=False, disposal=1)


def write_webp(uri: str, frames: np.ndarray, fps: float, *, quality: int = 90) -> None:
    """Animated WebP preview of `frames` (T, H, W, 3) uint8 (lossy, `quality` 0..100)."""
    _write_pillow(uri, frames, fps, "WEBP", quality=quality, method=4)
