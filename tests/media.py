"""Real media files for tests: good clips of every aspect ratio and container, and bad ones."""

from __future__ import annotations

import io
import os

import numpy as np

from sora.video_io import write_video  # imported before decord: its libvpx must load first

# (name, width, height): the shapes world's aspect ratios (docs/architecture.md), at small sizes
ASPECTS = [("16x9", 160, 90), ("9x16", 90, 160), ("1x1", 96, 96), ("4x3", 128, 96), ("3x4", 96, 128), ("239x100", 240, 100)]
CONTAINERS = [(".mp4", None), (".webm", None), (".avi", None), (".mov", "mjpeg")]


def moving_box(width: int, height: int, frames: int, color=(255, 64, 0), bg=(0, 0, 0), direction: int = 1) -> np.ndarray:
    """(T, H, W, 3) uint8: a box crossing the frame horizontally (motion for the filters)."""
    out = np.empty((frames, height, width, 3), np.uint8)
    out[:] = bg
    side = max(4, min(width, height) // 4)
    for t in range(frames):
        frac = t / max(1, frames - 1)
        x = int((frac if direction > 0 else 1 - frac) * (width - side))
        y = (height - side) // 2
        out[t, y : y + side, x : x + side] = color
    return out


def write_good_clips(root: str, frames: int = 24, fps: float = 12.0) -> dict[str, tuple[int, int]]:
    """One clip per (aspect, container) plus awkward names. Returns {path: (w, h)}."""
    os.makedirs(root, exist_ok=True)
    made = {}
    for i, (name, w, h) in enumerate(ASPECTS):
        ext, codec = CONTAINERS[i % len(CONTAINERS)]
        path = os.path.join(root, f"clip_{name}{ext}")
        write_video(path, moving_box(w, h, frames), fps, codec=codec)
        made[path] = (w, h)
    for ext, codec in CONTAINERS:  # every container at least once more, in a subdirectory
        path = os.path.join(root, "more", f"box {ext[1:]} ñ 日本{ext}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_video(path, moving_box(128, 72, frames, color=(0, 200, 255)), fps, codec=codec)
        made[path] = (128, 72)
    return made


def write_bad_files(root: str, good_mp4: str) -> dict[str, str]:
    """Inputs that must be quarantined, never crash the run. Returns {path: kind}."""
    os.makedirs(root, exist_ok=True)
    bad = {}

    def put(name: str, data: bytes, kind: str) -> None:
        path = os.path.join(root, name)
        with open(path, "wb") as f:
            f.write(data)
        bad[path] = kind

    put("zero.mp4", b"", "zero-byte")
    with open(good_mp4, "rb") as f:
        data = f.read()
    put("truncated.mp4", data[: len(data) // 2], "truncated")
    put("random.mp4", np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes(), "random bytes")
    put("notes.mp4", b"this is a text file, not a video\n" * 40, "text renamed to .mp4")
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(buf, format="PNG")
    put("picture.mp4", buf.getvalue(), "image renamed to .mp4")
    put("sound.mp4", _audio_only_mp4(), "audio only")
    return bad


def _audio_only_mp4() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        t = np.arange(16000 // 2) / 16000
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()
