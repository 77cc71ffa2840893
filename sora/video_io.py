"""Video I/O: probe, decode, resize, and write (PyAV, pillow).

Reading decodes what phones, cameras and the web write (rotation tags, H.264/HEVC/AV1/VP9/
ProRes/FFV1/MPEG-2/MJPEG, variable frame rate, non-square pixels) and returns the picture as
displayed; `sora.video_decode` says how. Everything that reads an untrusted file runs in one
persistent child process (`sora.video_worker`) that the caller kills when a deadline passes:
decord can hang inside C code holding the GIL, and a decoder can segfault. Both become a
`VideoError`.

Shapes: frames are `(T, H, W, 3)` uint8 RGB. Sizes are given as `(width, height)` like PIL.

Writers are plain functions that run in the caller (encoding our own arrays is trusted work);
the same frames give the same bytes, on an idle machine or a busy one.
Every function accepts a local path or any fsspec URL (`memory://`, `file://`, `s3://` ...);
remote inputs are copied to a local temp file first because decord and PyAV need a real file.
"""

from __future__ import annotations

import atexit
import contextlib
import fractions
import io
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

# FOOTGUN: import av before decord, in every process. decord bundles an older FFmpeg and libvpx;
# if it is loaded first, PyAV's libvpx-vp9 encoder binds to decord's symbols and fails to open
# ("avcodec_open2(libvpx-vp9) returned 22"). Importing av here, at the top, makes `import
# sora.video_io` enough; the decode worker imports av before decord for the same reason.
import av  # noqa: E402  (order matters, see above)

from sora.video_worker import DecodeWorker, WorkerCrash, WorkerTimeout  # noqa: E402

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
    """What `probe` learns about a video (it decodes one frame, to read its rotation).

    width/height are the displayed size: rotation applied (a phone's portrait clip stored
    landscape with a 90-degree tag is portrait here) and non-square pixels stretched.
    `num_frames` frames are readable (`read_frames` accepts `0..num_frames-1`): frame i is the
    picture on screen at i / fps. For variable-frame-rate video (`vfr`) `fps` is the real
    average rate and frames are resampled to it on the stream's timestamps.
    `codec` is the FFmpeg codec name ("h264", "hevc", "av1", "vp9", "prores", ...); `container`
    a short format name ("mp4", "mov", "webm", "matroska", "avi", "mpegts", ...); `decoder`
    the one that reads the frames ("decord", the fast path, or "pyav").
    """

    width: int
    height: int
    fps: float
    num_frames: int
    duration: float  # seconds, num_frames / fps
    codec: str
    container: str
    decoder: str = "decord"
    rotation: int = 0  # clockwise degrees the stored picture is turned for display
    sample_aspect: float = 1.0  # stored pixel width / height (anamorphic video: != 1)
    vfr: bool = False  # variable frame rate: resampled to `fps` on the timestamps
    coded_width: int = 0  # the stored picture, before rotation and pixel aspect
    coded_height: int = 0
    pix_fmt: str = ""  # e.g. "yuv420p", "yuv420p10le"
    bit_rate: int = 0  # bits per second of the whole file (its size over its duration)

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


def resize_frames(frames: np.ndarray, width: int, height: int, *,
                  box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Resize (T, H, W, 3) uint8 frames to (T, height, width, 3) keeping the aspect ratio.

    Scale to cover the target, centre-crop the excess (see `cover_crop_box`). Uses PIL's
    antialiased bicubic filter, whose kernel widens when shrinking, so downscaling does not alias.
    box: the source region (x0, y0, x1, y1) to scale instead, exactly as given (fractional
    allowed); the decoder uses it to crop and undo non-square pixels in one resampling.
    """
    from PIL import Image

    frames = _check_frames(frames)
    T, H, W, _ = frames.shape
    if box is None:
        if (W, H) == (width, height):
            return frames
        box = cover_crop_box(W, H, width, height)
    out = np.empty((T, height, width, 3), dtype=np.uint8)
    for t in range(T):
        img = Image.fromarray(frames[t])
        out[t] = np.asarray(img.resize((width, height), Image.Resampling.BICUBIC, box=box))
    return out


# --------------------------------------------------------------------------------------------
# Reading: runs in the caller, the work happens in the decode worker
# --------------------------------------------------------------------------------------------


def probe(uri: str, timeout: float = 20.0) -> VideoInfo:
    """Open `uri` (local path or fsspec URL) and describe its video stream (see VideoInfo).

    Raises VideoError for anything that is not a readable video, or when opening takes longer
    than `timeout` seconds (the decode process is killed). Fetching a remote URL to a temp file
    is not counted in `timeout`.
    """
    header, _ = _run_job(uri, {"op": "probe"}, timeout)
    return VideoInfo(**header["info"])


def read_frames(
    uri: str,
    indices: Sequence[int] | None = None,
    *,
    size: tuple[int, int] | None = None,
    crop: tuple[float, float, float, float] | None = None,
    timeout: float = 60.0,
) -> np.ndarray:
    """Decode frames of `uri` as displayed. Returns (T, H, W, 3) uint8 RGB.

    indices: frame numbers in `0..num_frames-1` (any order, repeats allowed); None = all frames.
        Frame i is the picture on screen at i / fps (see VideoInfo for variable-rate video).
    size: (width, height) of the output; frames are resized keeping their aspect ratio (cover,
        then centre-crop, see `resize_frames`). None keeps the displayed size (of the crop).
    crop: (x0, y0, x1, y1) in displayed pixels: only that box of the picture (e.g. the content
        inside black bars, see `sora.curation.letterbox`); None = the whole picture.
    timeout: seconds for opening + decoding + transfer; past it the decode process is killed
        and VideoError is raised.
    Raises VideoError for unreadable input, including frames missing from a truncated file
    (never returns made-up frames), IndexError for an index outside the video and ValueError
    for a crop box outside the picture.
    """
    if size is not None:
        assert len(size) == 2 and min(size) > 0, f"size must be (width, height) > 0, got {size}"
    job = {
        "op": "read",
        "indices": None if indices is None else [int(i) for i in indices],
        "size": None if size is None else [int(size[0]), int(size[1])],
        "crop": None if crop is None else [float(c) for c in crop],
    }
    header, frames = _run_job(uri, job, timeout)
    assert frames is not None and frames.shape == tuple(header["shape"]), "worker sent no frames"
    return frames


def start_decoder() -> None:
    """Start this process's decode worker now rather than at its first `probe` or `read_frames`
    (it is a fresh interpreter: seconds of imports on a busy machine), e.g. on a thread while a
    stage loads its models."""
    _WORKER.start()


def decoder_pid() -> int | None:
    """The pid of this process's decode worker, or None when none is running."""
    return _WORKER.pid


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
            job["threads"] = _decode_threads
            header, frames = _WORKER.run(job, timeout)
    except FileNotFoundError as e:  # fsspec: remote object missing
        raise VideoError(uri, f"no such file ({e})") from None
    except WorkerTimeout:
        raise VideoError(uri, f"decode timed out after {timeout:.1f} s") from None
    except WorkerCrash as e:
        raise VideoError(uri, f"decoder crashed ({e})") from None
    if header.get("error") == "index":
        raise IndexError(f"{uri}: {header['reason']}")
    if header.get("error") == "value":
        raise ValueError(f"{uri}: {header['reason']}")
    if header.get("error"):
        raise VideoError(uri, header["reason"])
    return header, frames


def set_decode_threads(threads: int | None) -> None:
    """Threads each decoder of this process's decode worker may use from now on: None keeps
    the libraries' default (FFmpeg picks from the cores); 1 where parallelism comes from
    several processes decoding at once (Ray tasks), whose decoder threads would otherwise
    contend for the same cores."""
    global _decode_threads
    if threads is not None and threads < 1:
        raise ValueError(f"decode threads must be >= 1 or None (the default), got {threads}")
    _decode_threads = threads or 0


_decode_threads = 0  # 0: the decoders' default (see set_decode_threads)

# The process-wide decode worker (tests swap in one with another handler).
_WORKER = DecodeWorker()
atexit.register(lambda: _WORKER.close())
os.register_at_fork(after_in_child=lambda: _WORKER.forget())  # a fork mid-call would inherit a held lock

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
    """(pixel format, encoder options) for `codec` at quality `crf` (lower = better).

    Every option that could let a thread schedule decide the bits is pinned: one encoder
    thread (also set on the codec context), and for the encoders with their own thread pools
    no lookahead, slice or row threads. `flags=+bitexact` keeps the FFmpeg version out of
    the bitstream (MPEG-4 and MJPEG write it as user data otherwise). x264 writes no B-frames
    (`bframes=0`): with them its lookahead reads memory it never wrote, so the same frames gave
    other bytes depending on what the process's heap held (no B-frames, or no macroblock tree,
    ends that; on the shapes world no B-frames even gives 2% fewer bytes at the same quality,
    the macroblock tree off 32% more)."""
    if codec in ("h264", "libx264"):
        return "yuv420p", {"crf": str(crf), "preset": "medium", "flags": "+bitexact",
                           "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:"
                                          "sync-lookahead=0:bframes=0"}
    if codec in ("libvpx-vp9", "vp9"):
        # crf with b:v 0 is VP9's constant-quality mode.
        return "yuv420p", {"crf": str(crf), "b:v": "0", "row-mt": "0", "cpu-used": "4",
                           "deadline": "good", "flags": "+bitexact"}
    if codec in ("mpeg4", "mjpeg"):
        # These have no crf; qscale ~ crf / 6 maps x264's "visually lossless" crf 18 to
        # qscale 3, which is near-transparent for MPEG-4 part 2 and MJPEG too.
        qscale = int(np.clip(round(crf / 6), 1, 31))
        return ("yuvj420p" if codec == "mjpeg" else "yuv420p"), {"qscale": str(qscale),
                                                                 "flags": "+bitexact"}
    return "yuv420p", {"flags": "+bitexact"}


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
    Output is deterministic: the same frames give the same bytes, however busy the machine and
    whatever the process's memory held before.
    Nothing on the way runs on a thread pool: the RGB -> YUV conversion is single-threaded
    (swscale's automatic slice threads hand out slices in whatever order threads come free),
    the encoder has one thread (see `_encoder_options`), and `+bitexact` on the muxer writes no
    version string or random segment id.
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
            stream.thread_type = "NONE"
            stream.codec_context.time_base = 1 / rate
            stream.options = options
            try:
                for t in range(T):
                    frame = av.VideoFrame.from_ndarray(frames[t], format="rgb24")
                    frame = frame.reformat(format=pix_fmt, threads=1)
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
