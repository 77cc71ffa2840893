"""Decoding untrusted video inside the decode worker (`sora.video_worker`): what phones, cameras
and the web write.

One job = inspect the file with PyAV (container, the video stream, every frame's timestamp,
rotation, pixel aspect), pick a decoder, decode the asked frames, and bring them to the
displayed picture. decord is the fast path; PyAV decodes what decord cannot open or misreads
(AV1, MPEG-TS, streams whose frame count or first frame disagree with PyAV's). Both run in the
worker, so the caller's deadline covers either.

Conventions (what `sora.video_io.probe` reports and `read_frames` returns):
- width/height are the displayed size: the rotation tag (display matrix) is applied (90 and
  270 give portrait frames) and non-square pixels are stretched to the display aspect
  (the larger of the two scaled sides is kept, so no resolution is thrown away);
- frame i is the frame on screen at time t0 + i / fps on the stream's own timestamps. For
  constant-rate video that is simply the i-th frame; for variable frame rate (phones) frames are
  resampled to a constant rate and `fps` is the real average rate;
- only the first video stream that is not an attached cover picture is read; audio, subtitle
  and data streams are ignored.

Shapes: frames are (T, H, W, 3) uint8 RGB.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# FOOTGUN: import av before decord, in every process (see sora/video_io.py); decord is
# imported lazily below, after this.
import av  # noqa: E402

from sora.video_io import cover_crop_box, resize_frames

# Codecs decord 0.6.0 cannot open (its bundled FFmpeg predates them) and containers whose frame
# index it builds wrongly (it seeks MPEG-TS by byte position and returns misordered frames).
_PYAV_ONLY_CODECS = ("av1",)
_PYAV_ONLY_CONTAINERS = ("mpegts",)
_IMAGE_DEMUXERS = ("image2", "_pipe")  # FFmpeg opens a single PNG/JPEG as a 1-frame "video"
# Frame 0 from decord and PyAV must agree this well (they differ only in YUV->RGB rounding and
# 10-bit dithering); less means decord misread the stream.
_AGREE_PSNR = 25.0
# A timestamp step this far (relative) from the median step makes a stream variable-rate.
_VFR_TOLERANCE = 0.25


class Reject(Exception):
    """An input that is not a readable video; the message is the human-readable reason."""


@dataclass
class Source:
    """What `inspect` learns about a file (all sizes in pixels)."""

    path: str
    container: str
    codec: str
    pix_fmt: str
    coded_width: int
    coded_height: int
    sample_aspect: float  # pixel width / pixel height (1.0 for square pixels)
    rotation: int  # clockwise degrees the stored picture is turned for display: 0/90/180/270
    pts: np.ndarray  # (N,) int64 presentation timestamps of the frames present, sorted
    time_base: float  # seconds per pts unit
    keyframe_pts: np.ndarray  # (K,) int64 pts of the key frames, sorted
    fps: float
    vfr: bool
    grid: np.ndarray  # (num_frames,) int64: output frame i shows source frame grid[i]
    decoder: str = "pyav"
    width: int = 0  # displayed
    height: int = 0
    bit_rate: int = 0  # bits per second of the whole file (size / duration)

    def info(self) -> dict:
        """The fields of `sora.video_io.VideoInfo`."""
        n = len(self.grid)
        return {"width": self.width, "height": self.height, "fps": self.fps, "num_frames": n,
                "duration": n / self.fps, "codec": self.codec, "container": self.container,
                "decoder": self.decoder, "rotation": self.rotation,
                "sample_aspect": self.sample_aspect, "vfr": self.vfr,
                "coded_width": self.coded_width, "coded_height": self.coded_height,
                "pix_fmt": self.pix_fmt, "bit_rate": self.bit_rate}


# --------------------------------------------------------------------------------------------
# Inspect: container, stream, timestamps, rotation, pixel aspect (PyAV, no full decode)
# --------------------------------------------------------------------------------------------


def _container_name(fmt: str, path: str, metadata: dict) -> str:
    """A short container name from FFmpeg's demuxer name (which lumps mp4/mov, mkv/webm)."""
    if fmt.startswith("mov,mp4"):
        return "mov" if metadata.get("major_brand", "").strip() == "qt" else "mp4"
    if fmt.startswith("matroska"):
        with open(path, "rb") as f:  # the EBML header names its DocType in the first bytes
            return "webm" if b"webm" in f.read(64) else "matroska"
    return fmt.split(",")[0]


def _open(path: str):
    try:
        return av.open(path)
    except av.error.FFmpegError as e:
        with open(path, "rb") as f:
            head = f.read(12)
        if head[4:8] == b"ftyp":  # an ISO-BMFF file whose index (moov) never got written
            raise Reject("truncated or incomplete mp4/mov: no index (moov atom) found; "
                         "the file was probably cut off while being written") from None
        raise Reject(f"not a video: unrecognised or corrupt container ({e.strerror or e})") from None


def _video_stream(container):
    """The first video stream that is not an attached picture (cover art), or Reject."""
    attached = av.stream.Disposition.attached_pic
    videos = [s for s in container.streams.video if not (s.disposition & attached)]
    if videos:
        return videos[0]
    others = [f"{len(s)} {kind}" for kind, s in
              (("audio", container.streams.audio), ("subtitle", container.streams.subtitles),
               ("data", container.streams.data)) if len(s)]
    if len(container.streams.video):
        others.append("an attached cover picture")
    found = f" (found {', '.join(others)})" if others else ""
    raise Reject(f"not a video: no video stream{found}")


def _rotation(frame) -> int:
    """Clockwise display rotation of a decoded frame, snapped to 0/90/180/270.
    PyAV reports the display matrix's angle counter-clockwise, in [-180, 180]."""
    return int(round(-frame.rotation / 90.0)) % 4 * 90


def _display_size(w: int, h: int, sar: float, rotation: int) -> tuple[int, int]:
    """Displayed (width, height): stretch the short axis of non-square pixels, then rotate."""
    if sar > 1:
        w = int(round(w * sar))
    elif sar < 1:
        h = int(round(h / sar))
    return (h, w) if rotation in (90, 270) else (w, h)


def _timing(pts: np.ndarray, time_base: float, declared_rate) -> tuple[float, bool, np.ndarray]:
    """(fps, variable-rate?, grid) from the sorted frame timestamps.

    Constant rate: the container's rate when it agrees with the timestamps, grid = identity.
    Variable rate: fps = (N - 1) / span, and grid[i] = the source frame nearest t0 + i / fps.
    """
    n = len(pts)
    identity = np.arange(n, dtype=np.int64)
    declared = float(declared_rate) if declared_rate else 0.0
    if n < 3:
        return (declared if declared > 0 else 25.0), False, identity
    t = (pts - pts[0]) * time_base
    steps = np.diff(t)
    median = float(np.median(steps))
    measured = (n - 1) / float(t[-1]) if t[-1] > 0 else 0.0
    if median <= 0 or measured <= 0:
        return (declared if declared > 0 else 25.0), False, identity
    vfr = bool(np.any(np.abs(steps - median) > _VFR_TOLERANCE * median))
    if not vfr:
        fps = declared if declared > 0 and abs(declared / measured - 1) < 0.05 else measured
        return fps, False, identity
    grid_t = np.arange(n) / measured
    right = np.clip(np.searchsorted(t, grid_t), 1, n - 1)
    nearest = np.where(grid_t - t[right - 1] <= t[right] - grid_t, right - 1, right)
    return measured, True, nearest.astype(np.int64)


def inspect(path: str) -> tuple[Source, object]:
    """Describe the file and open its decoder: (Source, decord reader or None). Raises Reject."""
    with _open(path) as container:
        fmt = container.format.name
        stream = _video_stream(container)
        codec = stream.codec_context.codec.canonical_name  # "av1", not the decoder "libdav1d"
        if any(tag in fmt for tag in _IMAGE_DEMUXERS):
            raise Reject(f"not a video: a still image ({codec})")
        declared = int(stream.frames or 0)
        pts, keys = [], []
        try:
            for i, packet in enumerate(container.demux(stream)):
                if not packet.size:
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                pts.append(stamp if stamp is not None else i)
                if packet.is_keyframe:
                    keys.append(pts[-1])
        except av.error.FFmpegError:
            pass  # a damaged tail: what was read is what is present
        if 0 < len(pts) < declared:
            raise Reject(f"truncated: container lists {declared} frames but only "
                         f"{len(pts)} are present")
        pts = np.unique(np.asarray(pts, dtype=np.int64))
        if not len(pts):
            raise Reject("not a video: the video stream has no frames")
        time_base = float(stream.time_base) if stream.time_base else 1.0
        fps, vfr, grid = _timing(pts, time_base, stream.average_rate or stream.guessed_rate)
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
        src = Source(
            path=path, container=_container_name(fmt, path, dict(container.metadata)),
            codec=codec, pix_fmt=str(stream.codec_context.pix_fmt or ""),
            coded_width=int(stream.codec_context.width), coded_height=int(stream.codec_context.height),
            sample_aspect=float(sar) if sar and sar > 0 else 1.0, rotation=0, pts=pts,
            time_base=time_base, keyframe_pts=np.unique(np.asarray(keys or [pts[0]], np.int64)),
            fps=fps, vfr=vfr, grid=grid)
    first, pyav_error = None, None
    try:
        first = _decode_pyav(src, [0])[0]  # also reads the rotation (see _decode_pass)
    except Reject as e:
        pyav_error = str(e)
    reader, decord_error = _open_decord(src, first)
    if reader is None and first is None:
        raise Reject(f"corrupt video: no decoder can read it (decord: {decord_error}; "
                     f"PyAV: {pyav_error})")
    if first is None:  # decord applied a rotation PyAV could not tell us: read it off the shape
        h0, w0 = reader[0].shape[:2]
        src.rotation = 90 if (w0, h0) == (src.coded_height, src.coded_width) != \
            (src.coded_width, src.coded_height) else 0
    src.decoder = "decord" if reader is not None else "pyav"
    w, h = _display_size(src.coded_width, src.coded_height, src.sample_aspect, src.rotation)
    src.width, src.height = w, h
    if min(w, h) < 1:
        raise Reject(f"corrupt video: the stream says {w}x{h} pixels")
    if not src.fps > 0:
        raise Reject(f"corrupt video: frame rate is {src.fps}")
    src.bit_rate = int(os.path.getsize(path) * 8 * src.fps / len(src.grid))
    return src, reader


# --------------------------------------------------------------------------------------------
# decord: the fast path
# --------------------------------------------------------------------------------------------


def _short(e: Exception) -> str:
    """A decoder error in a few words: FFmpeg's message without errno and call, or decord's
    first line without its C++ location and check boilerplate."""
    if isinstance(e, av.error.FFmpegError) and e.strerror:
        return str(e.strerror)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "Stack trace" not in ln]
    text = lines[0] if lines else type(e).__name__
    text = text.split("] ", 1)[-1]
    text = re.sub(r"^\S+\.(cc|h|cpp):\d+: ", "", text)
    text = re.sub(r"^Check failed: .*? (?=[A-Z])", "", text) if text.startswith("Check failed") else text
    return text[:120]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over every other pixel (enough to tell a misread frame from a good one)."""
    a, b = a[::2, ::2].astype(np.float32), b[::2, ::2].astype(np.float32)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _open_decord(src: Source, first: np.ndarray | None) -> tuple[object, str | None]:
    """A decord reader that reads this stream the way PyAV does, or (None, why not).

    `first` is PyAV's frame 0 (stored orientation) when PyAV could decode it; decord applies
    the rotation tag itself, so its frames are compared after rotating PyAV's."""
    if src.codec in _PYAV_ONLY_CODECS:
        return None, f"decord cannot decode {src.codec}"
    if src.container in _PYAV_ONLY_CONTAINERS:
        return None, f"decord misreads {src.container}"
    import decord  # after av (see the FOOTGUN note at the top)

    try:
        reader = decord.VideoReader(src.path, num_threads=_threads)  # 0: decord's default
    except Exception as e:  # DECORDError or RuntimeError, depending on where decord fails
        return None, f"cannot open it ({_short(e)})"
    if len(reader) != len(src.pts):
        return None, f"it counts {len(reader)} frames where the stream has {len(src.pts)}"
    try:
        frame0 = _decord_batch(reader, [0], len(src.pts))[0]
    except Reject as e:
        return None, str(e)
    if first is not None:
        want = np.rot90(first, k=-src.rotation // 90)
        if frame0.shape != want.shape or _psnr(frame0, want) < _AGREE_PSNR:
            return None, "its frame 0 differs from PyAV's"
    return reader, None


def _decord_batch(reader, indices: list[int], n: int) -> np.ndarray:
    """(T, H, W, 3) for source `indices`; raises Reject naming the first frame that fails."""
    try:
        return reader.get_batch(indices).asnumpy()
    except Exception as e:
        if "DECORDArrayCopyFromTo" in str(e):
            return _decord_padded_rows(reader, indices, n)
    # Find the first failing frame to say where the file breaks (error path only).
    for i in sorted(set(indices)):
        try:
            reader[i].asnumpy()
        except Exception:
            raise Reject(f"truncated or corrupt: frame {i} of {n} could not be decoded") from None
    raise Reject("corrupt video: decord failed to decode the batch")


def _decord_padded_rows(reader, indices: list[int], n: int) -> np.ndarray:
    """Work around a decord 0.6.0 bug. For a few small widths (8, 12, 16, 24, 48, 72 px) FFmpeg
    pads each RGB row to an aligned length and decord reports the padded buffer as
    (H, W, linesize / W) instead of (H, W, 3); `get_batch` then fails with "DECORDArrayCopyFromTo:
    The size must exactly match". Single frames still come out, so we cut the real W * 3 bytes
    out of each padded row: exact pixels, no resampling.
    """
    out = []
    for i in indices:
        try:
            raw = reader[i].asnumpy()
        except Exception:
            raise Reject(f"truncated or corrupt: frame {i} of {n} could not be decoded") from None
        height, width = raw.shape[:2]
        rows = raw.reshape(height, -1)  # (H, linesize): one padded row of bytes per image row
        assert rows.shape[1] >= width * 3, f"decord row of {rows.shape[1]} bytes < {width} px"
        out.append(rows[:, : width * 3].reshape(height, width, 3))
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# PyAV: everything else
# --------------------------------------------------------------------------------------------


def _decode_pyav(src: Source, indices: list[int]) -> list[np.ndarray]:
    """Frames (stored orientation) for source `indices`, matched by timestamp: seek to a key
    frame before the first one, decode forward. Raises Reject for frames that never come.

    Seeking is by timestamp and some containers (MPEG-TS) land past the key frame asked for:
    then an earlier key frame is tried, and at last a decode from the start."""
    want = {int(src.pts[i]): i for i in indices}
    got: dict[int, np.ndarray] = {}
    first = min(want)
    earlier = src.keyframe_pts[(src.keyframe_pts <= first) & (src.keyframe_pts > src.pts[0])]
    starts = [int(k) for k in earlier[::-1][:3]] + [None]  # None: from the start, no seek
    errors = []
    for start in starts:
        try:
            if _decode_pass(src, want, got, start):
                break
        except (av.error.FFmpegError, ValueError) as e:
            errors.append(e)
    missing = sorted(i for p, i in want.items() if p not in got)
    if missing:
        why = f" ({_short(errors[-1])})" if errors else ""
        raise Reject(f"truncated or corrupt: frame {missing[0]} of {len(src.pts)} could not be "
                     f"decoded{why}")
    return [got[int(src.pts[i])] for i in indices]


def _decode_pass(src: Source, want: dict[int, int], got: dict, start: int | None) -> bool:
    """Decode from the key frame at pts `start` (None: the beginning) until every frame in
    `want` is in `got`. False when a seek landed past the first frame still missing."""
    missing = [p for p in want if p not in got]
    if not missing:
        return True
    first, last = min(missing), max(want)
    with av.open(src.path) as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"
        if _threads:
            stream.thread_count = _threads
        if start is not None:
            container.seek(start, stream=stream, backward=True)
        landed = start is None
        for frame in container.decode(stream):
            src.rotation = _rotation(frame)  # one display matrix per stream
            stamp = frame.pts if frame.pts is not None else frame.dts
            if not landed:
                if stamp is None or stamp > first:
                    return False
                landed = True
            if stamp in want and stamp not in got:
                got[stamp] = frame.to_ndarray(format="rgb24")
            if stamp is not None and stamp >= last and len(got) == len(want):
                return True
    return len(got) == len(want)


# --------------------------------------------------------------------------------------------
# One job
# --------------------------------------------------------------------------------------------


def _to_display(frames: np.ndarray, src: Source, size: tuple[int, int] | None,
                crop: tuple[float, float, float, float] | None) -> np.ndarray:
    """Upright frames at stored scale -> the displayed picture, cropped to `crop` (display
    pixels x0, y0, x1, y1) and resized to `size` (keeping the aspect: cover, centre-crop).
    One resampling covers pixel aspect, crop and resize."""
    T, Hs, Ws, _ = frames.shape
    sx, sy = Ws / src.width, Hs / src.height  # stored pixels per display pixel
    x0, y0, x1, y1 = crop if crop is not None else (0, 0, src.width, src.height)
    if not (0 <= x0 < x1 <= src.width and 0 <= y0 < y1 <= src.height):
        raise ValueError(f"crop {crop} is outside the {src.width}x{src.height} picture")
    tw, th = size if size is not None else (int(round(x1 - x0)), int(round(y1 - y0)))
    bx0, by0, bx1, by1 = cover_crop_box(x1 - x0, y1 - y0, tw, th)
    box = ((x0 + bx0) * sx, (y0 + by0) * sy, (x0 + bx1) * sx, (y0 + by1) * sy)
    if box == (0, 0, Ws, Hs) and (tw, th) == (Ws, Hs):
        return frames
    if not T:
        return np.empty((0, th, tw, 3), np.uint8)
    return resize_frames(frames, tw, th, box=box)


def read(src: Source, reader, indices: list[int] | None) -> np.ndarray:
    """Upright frames (stored scale) for output `indices` (None = all)."""
    n = len(src.grid)
    indices = list(range(n)) if indices is None else indices
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise IndexError(f"frame index {bad[0]} out of range for a video of {n} frames")
    if not indices:
        h, w = (src.coded_width, src.coded_height) if src.rotation in (90, 270) else \
            (src.coded_height, src.coded_width)
        return np.empty((0, h, w, 3), np.uint8)
    wanted = sorted({int(src.grid[i]) for i in indices})
    if reader is not None:
        decoded = _decord_batch(reader, wanted, len(src.pts))  # decord applies the rotation
    else:
        decoded = np.stack([np.rot90(f, k=-src.rotation // 90)
                            for f in _decode_pyav(src, wanted)])
    at = {j: t for t, j in enumerate(wanted)}
    return np.ascontiguousarray(decoded[[at[int(src.grid[i])] for i in indices]])


# The last few files inspected, with their open decord readers: a stage that reads many clips
# of one source inspects it once. Keyed by (path, size, mtime) so a rewritten file is re-read.
_OPEN: "OrderedDict[tuple, tuple[Source, object]]" = OrderedDict()
_OPEN_MAX = 4

# Threads each decoder opened by this process may use (FFmpeg's thread_count, for decord and
# PyAV alike): 0 lets FFmpeg pick from the cores. Each job sets it (see
# `sora.video_io.set_decode_threads`); the threads are fixed when a decoder opens.
_threads = 0


def _inspect_cached(path: str) -> tuple[Source, object]:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, _threads)
    if key in _OPEN:
        _OPEN.move_to_end(key)
        return _OPEN[key]
    found = inspect(path)
    _OPEN[key] = found
    while len(_OPEN) > _OPEN_MAX:
        _OPEN.popitem(last=False)
    return found


def serve(job: dict) -> tuple[dict, np.ndarray | None]:
    """The decode worker's job handler: {"op": "probe" | "read", "path", "indices", "size",
    "crop", "threads"} -> (reply header, frames or None)."""
    global _threads
    _threads = max(0, int(job.get("threads") or 0))
    try:
        src, reader = _inspect_cached(job["path"])
        if job["op"] == "probe":
            return {"info": src.info()}, None
        frames = read(src, reader, job.get("indices"))
        size, crop = job.get("size"), job.get("crop")
        return {}, _to_display(frames, src, tuple(size) if size else None,
                               tuple(crop) if crop else None)
    except Reject as e:
        return {"error": "video", "reason": str(e)}, None
    except IndexError as e:
        return {"error": "index", "reason": str(e)}, None
    except ValueError as e:
        return {"error": "value", "reason": str(e)}, None
    except Exception as e:  # anything else a hostile file provokes is still the file's fault
        return {"error": "video", "reason": f"decoder error: {type(e).__name__}: {_short(e)}"}, None
