"""sora.video_io on real files: every aspect ratio x every container, awkward names and URLs,
aspect-preserving resize, broken inputs, the decode deadline, crashes, deterministic writes."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import fsspec
import numpy as np
import pytest
from PIL import Image

from footage import fault_worker
from sora import video_io
from sora.video_io import (VideoError, cover_crop_box, probe, read_frames, resize_frames,
                           write_gif, write_video, write_webp)

# (name, width, height): the shapes world's aspect ratios (docs/architecture.md) at small, even sizes.
ASPECTS = [("16:9", 128, 72), ("9:16", 72, 128), ("1:1", 80, 80), ("4:3", 96, 72),
           ("3:4", 72, 96), ("2.39:1", 172, 72)]
# (extension, codec passed to write_video, codec probe reports, container probe reports, fps)
CONTAINERS = [(".mp4", None, "h264", "mp4", 24.0), (".webm", None, "vp9", "webm", 30.0),
              (".avi", None, "mpeg4", "avi", 25.0), (".mov", "mjpeg", "mjpeg", "mov", 30000 / 1001)]
# Worst-frame PSNR we require after an encode/decode round trip at the default crf 18.
# Measured minimum on these clips: h264/vp9 38.9 dB, mpeg4/mjpeg 29.7 dB (8x8 DCT ringing at
# the box edges); the thresholds leave about 3 dB of margin.
MIN_PSNR = {"h264": 35.0, "vp9": 35.0, "mpeg4": 26.0, "mjpeg": 26.0}
T = 12


def moving_box(width: int, height: int, frames: int = T) -> np.ndarray:
    """(T, H, W, 3) uint8: a yellow square crossing a colour gradient left to right.
    The square's corners sit on even pixels so 4:2:0 chroma can represent its edges."""
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([40 + x * 150 // width, 40 + y * 150 // height,
                           np.full_like(x, 90)], axis=-1).astype(np.uint8)
    out = np.repeat(background[None], frames, axis=0)
    side = (height // 3) // 2 * 2
    for t in range(frames):
        x0 = int((width - side) * t / max(frames - 1, 1)) // 2 * 2
        y0 = (height // 3) // 2 * 2
        out[t, y0:y0 + side, x0:x0 + side] = (230, 200, 40)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def bbox(mask: np.ndarray) -> tuple[int, int]:
    """(width, height) of the bounding box of the True pixels of an (H, W) mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


# ---------------------------------------------------------------------------------------------
# Round trips: every aspect ratio x every container
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext, codec, want_codec, want_container, fps", CONTAINERS,
                         ids=[c[0][1:] for c in CONTAINERS])
def test_round_trip_every_aspect(tmp_path, ext, codec, want_codec, want_container, fps):
    for name, width, height in ASPECTS:
        frames = moving_box(width, height)
        path = str(tmp_path / f"clip{ext}")
        write_video(path, frames, fps, codec=codec)

        info = probe(path)
        assert (info.width, info.height, info.num_frames) == (width, height, T), (name, info)
        assert info.fps == pytest.approx(fps, rel=1e-3), (name, info)
        assert (info.codec, info.container) == (want_codec, want_container), (name, info)
        assert info.duration == pytest.approx(T / fps, rel=1e-3)
        assert info.aspect == pytest.approx(width / height)

        decoded = read_frames(path)
        assert decoded.shape == (T, height, width, 3) and decoded.dtype == np.uint8
        worst = min(psnr(decoded[t], frames[t]) for t in range(T))
        assert worst > MIN_PSNR[want_codec], f"{name} {ext}: worst frame PSNR {worst:.1f} dB"

        # Random access returns the frames asked for, in the order asked (the box moves, so a
        # frame matches itself far better than its neighbours).
        picked = read_frames(path, [7, 0, 7, 11])
        for got, t in zip(picked, [7, 0, 7, 11]):
            scores = [psnr(got, frames[s]) for s in range(T)]
            assert int(np.argmax(scores)) == t, f"{name} {ext}: asked frame {t}, got {np.argmax(scores)}"


def test_decord_padded_row_widths_are_exact(tmp_path):
    """decord 0.6.0 mis-shapes frames of a few widths (8..72 px); we must still return the
    exact pixels (same quality as a normal width), not fail or resample."""
    for width in (8, 24, 48, 72):
        frames = moving_box(width, 32)
        path = str(tmp_path / f"w{width}.mp4")
        write_video(path, frames, 12)
        decoded = read_frames(path)
        assert decoded.shape == frames.shape
        assert min(psnr(decoded[t], frames[t]) for t in range(T)) > 28.0, width


def test_awkward_names_and_urls(tmp_path, monkeypatch):
    frames = moving_box(96, 72)
    # A name with spaces and non-ASCII letters.
    path = str(tmp_path / "clip ñ 日本.mp4")
    write_video(path, frames, 24)
    assert probe(path).num_frames == T
    assert psnr(read_frames(path, [5])[0], frames[5]) > 35
    assert probe("file://" + path).width == 96

    # memory:// both ways; remote reads and writes go through temp files that must not linger.
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    url = "memory://videos/a clip ñ.webm"
    write_video(url, frames, 24)
    assert fsspec.filesystem("memory").size("/videos/a clip ñ.webm") > 0
    info = probe(url)
    assert (info.width, info.height, info.num_frames, info.codec) == (96, 72, T, "vp9")
    decoded = read_frames(url, size=(48, 36))
    assert decoded.shape == (T, 36, 48, 3)
    assert psnr(decoded[3], resize_frames(frames[3:4], 48, 36)[0]) > 30
    assert list(temp_dir.iterdir()) == [], "temp copies were left behind"

    with pytest.raises(VideoError, match="no such file"):
        probe("memory://videos/missing.mp4")
    with pytest.raises(VideoError, match="no such file"):
        probe(str(tmp_path / "missing.mp4"))


# ---------------------------------------------------------------------------------------------
# Resize keeps the aspect ratio
# ---------------------------------------------------------------------------------------------


def test_cover_crop_box_analytic():
    # 16:9 -> 9:16: keep full height, crop a 1080 * 9/16 = 607.5 px wide centred column.
    assert cover_crop_box(1920, 1080, 1080, 1920) == (656.25, 0.0, 1263.75, 1080.0)
    # 4:3 -> 16:9: keep full width, crop 640 * 9/16 = 360 rows from the middle.
    assert cover_crop_box(640, 480, 1280, 720) == (0.0, 60.0, 640.0, 420.0)
    assert cover_crop_box(100, 50, 200, 100) == (0.0, 0.0, 100.0, 50.0)  # same aspect


@pytest.mark.parametrize("dst", [(64, 64), (36, 64), (96, 40), (200, 150)])
def test_resize_keeps_shapes_square(dst):
    """A square drawn in a 16:9 frame stays square at every target aspect; a plain stretch
    (what decord's width/height arguments do) would not."""
    frame = np.zeros((1, 72, 128, 3), np.uint8)
    frame[0, 26:46, 54:74] = 255  # 20 x 20 square at the centre
    out = resize_frames(frame, *dst)
    assert out.shape == (1, dst[1], dst[0], 3)
    w, h = bbox(out[0, ..., 0] > 127)
    assert abs(w - h) <= 1, f"square became {w}x{h} at {dst}"
    scale = max(dst[0] / 128, dst[1] / 72)  # cover scaling
    assert abs(w - 20 * scale) <= 1.5, (w, 20 * scale)
    stretched = np.asarray(Image.fromarray(frame[0]).resize(dst))
    sw, sh = bbox(stretched[..., 0] > 127)
    assert abs(sw - sh) > 1 or dst[0] * 72 == dst[1] * 128  # the test can tell the difference


def test_read_frames_resizes_keeping_aspect(tmp_path):
    frames = np.zeros((4, 72, 128, 3), np.uint8)
    frames[:, 26:46, 54:74] = (255, 255, 255)
    path = str(tmp_path / "square.mp4")
    write_video(path, frames, 8)
    out = read_frames(path, [0, 3], size=(48, 80))  # 16:9 source to a 3:5 portrait target
    assert out.shape == (2, 80, 48, 3)
    w, h = bbox(out[1, ..., 0] > 127)
    assert abs(w - h) <= 1, f"square became {w}x{h}"


# ---------------------------------------------------------------------------------------------
# Broken inputs: one clear error, a meaningful reason, quickly, no crash
# ---------------------------------------------------------------------------------------------


def _noisy_clip() -> np.ndarray:
    """Frames that do not compress away, so cutting the file at half loses real frames."""
    frames = np.random.default_rng(0).integers(0, 256, (30, 64, 96, 3), dtype=np.uint8)
    frames[:, 20:40, 30:50] = (255, 0, 0)
    return frames


def _audio_only(path: str) -> None:
    import av

    with av.open(path, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        t = np.arange(8000) / 16000
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _moov_last_mp4(path: str, frames: np.ndarray) -> None:
    """An mp4 with its index at the end (no faststart), as most cameras and tools write it."""
    import av

    with av.open(path, "w", format="mp4") as out:
        stream = out.add_stream("h264", rate=24)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for t, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = t
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """{kind: (path, a phrase the reason must contain)}"""
    root = tmp_path_factory.mktemp("broken")
    files = {}

    def put(kind: str, name: str, data: bytes, phrase: str) -> None:
        (root / name).write_bytes(data)
        files[kind] = (str(root / name), phrase)

    put("zero-byte", "zero.mp4", b"", "empty file (0 bytes)")
    put("random", "random.mp4", np.random.default_rng(1).bytes(20_000), "not a video")
    put("text", "notes.mp4", b"this is a text file, not a video\n" * 40, "not a video")
    png = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png, format="PNG")
    put("png", "picture.mp4", png.getvalue(), "still image")

    frames = _noisy_clip()
    write_video(str(root / "full.mp4"), frames, 24)  # faststart: index first, cut loses frames
    data = (root / "full.mp4").read_bytes()
    put("truncated", "half.mp4", data[: len(data) // 2], "truncated")
    _moov_last_mp4(str(root / "full_moov_last.mp4"), frames)
    data = (root / "full_moov_last.mp4").read_bytes()
    put("truncated-no-index", "half_moov_last.mp4", data[: len(data) // 2], "truncated")

    _audio_only(str(root / "sound.m4a"))
    files["audio-only"] = (str(root / "sound.m4a"), "no video stream")
    return files


@pytest.mark.parametrize("kind", ["zero-byte", "random", "text", "png", "truncated",
                                  "truncated-no-index", "audio-only"])
def test_broken_inputs_raise_video_error(broken_files, kind):
    path, phrase = broken_files[kind]
    for call in (lambda: probe(path, timeout=10), lambda: read_frames(path, timeout=10)):
        start = time.monotonic()
        with pytest.raises(VideoError) as err:
            call()
        assert time.monotonic() - start < 10
        assert phrase in err.value.reason, err.value.reason
        assert err.value.source == path and phrase in str(err.value) and path in str(err.value)
    good = os.path.join(os.path.dirname(path), "full.mp4")
    assert read_frames(good, [0, 29]).shape == (2, 64, 96, 3)  # the worker is still healthy


def test_truncated_file_never_returns_made_up_frames(tmp_path):
    """A cut webm opens (its header survives) and reports fewer frames; every frame it returns
    is the real one, and asking past the end is an error, not a repeat of the last frame."""
    frames = _noisy_clip()
    full = str(tmp_path / "full.webm")
    write_video(full, frames, 24)
    data = open(full, "rb").read()
    cut = str(tmp_path / "cut.webm")
    open(cut, "wb").write(data[: len(data) // 2])
    n = probe(cut).num_frames
    assert 0 < n < 30
    decoded = read_frames(cut, list(range(n - 1)))  # the last one may be partly damaged
    reference = read_frames(full, list(range(n - 1)))
    assert all(psnr(a, b) > 40 for a, b in zip(decoded, reference))
    with pytest.raises(IndexError):
        read_frames(cut, [n + 2])


# ---------------------------------------------------------------------------------------------
# Deadline and crash isolation
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def faulty_worker(monkeypatch):
    """The process-wide decode worker swapped for one whose handler hangs on files named
    *hangs* and segfaults on *crashes* (tests/footage.py), the way real decoders fail."""
    worker = fault_worker()
    monkeypatch.setattr(video_io, "_WORKER", worker)
    yield worker
    worker.close()


def test_hang_is_killed_and_worker_restarts(tmp_path, faulty_worker):
    path = str(tmp_path / "ok.mp4")
    write_video(path, moving_box(64, 48), 12)
    hangs = str(tmp_path / "hangs.mp4")
    shutil.copy(path, hangs)
    probe(path)
    pid = faulty_worker.pid
    probe(path)
    assert faulty_worker.pid == pid, "the worker must be reused between calls"

    start = time.monotonic()
    with pytest.raises(VideoError, match=r"timed out after 1\.5 s"):
        read_frames(hangs, timeout=1.5)
    assert time.monotonic() - start < 4.0
    assert read_frames(path).shape == (T, 48, 64, 3)  # a fresh worker serves the next call
    assert faulty_worker.pid != pid


def test_start_decoder_starts_the_worker_the_reads_then_use(tmp_path, faulty_worker):
    path = str(tmp_path / "ok.mp4")
    write_video(path, moving_box(64, 48), 12)
    assert faulty_worker.pid is None
    video_io.start_decoder()
    pid = faulty_worker.pid
    assert pid is not None
    video_io.start_decoder()  # a running worker is kept
    assert faulty_worker.pid == pid
    assert read_frames(path).shape == (T, 48, 64, 3)
    assert faulty_worker.pid == pid, "the read must use the worker started ahead"


def test_decoder_crash_becomes_video_error(tmp_path, faulty_worker):
    path = str(tmp_path / "ok.mp4")
    write_video(path, moving_box(64, 48), 12)
    crashes = str(tmp_path / "crashes.mp4")
    shutil.copy(path, crashes)
    with pytest.raises(VideoError, match="decoder crashed.*SIGSEGV") as err:
        probe(crashes)
    assert probe(path).num_frames == T
    # The error survives pickling with both fields (Ray ships exceptions between processes).
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.source, again.reason) == (err.value.source, err.value.reason)


def test_index_errors_and_empty_selection(tmp_path):
    path = str(tmp_path / "ok.mp4")
    write_video(path, moving_box(64, 48), 12)
    with pytest.raises(IndexError, match="out of range"):
        read_frames(path, [0, T])
    with pytest.raises(IndexError):
        read_frames(path, [-1])
    assert read_frames(path, []).shape == (0, 48, 64, 3)
    assert read_frames(path, [], size=(32, 32)).shape == (0, 32, 32, 3)


def _worker_threads() -> int:
    """Threads of this process's decode worker right now (Linux)."""
    return len(os.listdir(f"/proc/{video_io._WORKER.pid}/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts the decode worker's threads in /proc; needs 2+ cores for FFmpeg to thread")
def test_decode_threads_pinned_to_one(tmp_path):
    """set_decode_threads(1) opens every decoder with one thread (parallel Ray tasks each decode
    on their own core) and decodes the same frames as the default thread count."""
    frames = moving_box(320, 240, 2 * T)
    paths = [str(tmp_path / f"v{i}.mp4") for i in range(2)]
    for p in paths:
        write_video(p, frames, 12)
    video_io._WORKER.kill()  # a fresh worker: no decoder left open by another test
    try:
        default = read_frames(paths[0])
        with_default = _worker_threads()
        video_io._WORKER.kill()
        video_io.set_decode_threads(1)
        pinned = read_frames(paths[1])
        with_one = _worker_threads()
    finally:
        video_io.set_decode_threads(None)
    np.testing.assert_array_equal(pinned, default)
    assert with_one < with_default, (with_one, with_default)
    with pytest.raises(ValueError, match=">= 1"):
        video_io.set_decode_threads(0)


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext, codec", [(".mp4", None), (".webm", None), (".avi", None),
                                        (".mov", "mjpeg")])
def test_write_video_is_deterministic(tmp_path, ext, codec):
    frames = moving_box(96, 72)
    digests = set()
    for i in range(2):
        path = str(tmp_path / f"run{i}{ext}")
        write_video(path, frames, 24, codec=codec)
        digests.add(hashlib.sha256(open(path, "rb").read()).hexdigest())
    assert len(digests) == 1


# Writes a small clip (32 pixels wide: with B-frames, x264's lookahead read memory it never
# wrote on such frames) with every default codec and prints {ext: sha256} as JSON.
_SMALL_ENCODE_SCRIPT = """
import hashlib, json, sys
import numpy as np
from sora.video_io import write_video
rng = np.random.default_rng(1)
base = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
frames = np.stack([np.roll(base, 2 * t, axis=1) for t in range(9)])
out = {}
for ext, codec in ((".mp4", None), (".webm", None), (".avi", None), (".mov", "mjpeg")):
    path = f"{sys.argv[1]}/small{ext}"
    write_video(path, frames, 8, codec=codec)
    out[ext] = hashlib.sha256(open(path, "rb").read()).hexdigest()
print(json.dumps(out))
"""


def test_write_video_bytes_do_not_depend_on_what_the_heap_held(tmp_path):
    """The same frames give the same bytes in processes whose fresh allocations hold different
    garbage (glibc's MALLOC_PERTURB_ fills them with a set byte): an encoder reading memory it
    never wrote shows here (x264 with B-frames did; a bulk run's videos then differed from a
    re-run's)."""
    import json

    digests = []
    for byte in ("85", "165"):
        d = tmp_path / byte
        d.mkdir()
        env = dict(os.environ, MALLOC_PERTURB_=byte)
        proc = subprocess.run([sys.executable, "-c", _SMALL_ENCODE_SCRIPT, str(d)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert digests[0] == digests[1]


# Encodes shapes-world clips with every default codec and prints {file: sha256} as JSON.
_ENCODE_SCRIPT = """
import hashlib, json, sys
from sora.shapes import TINY, render, sample_clip
from sora.video_io import write_video
out = {}
for i in range(4):
    spec = sample_clip(11, i, ranges=TINY)
    for ext, codec in ((".mp4", None), (".webm", None), (".avi", None), (".mov", "mjpeg")):
        path = f"{sys.argv[1]}/clip{i}{ext}"
        write_video(path, render(spec), spec.fps, codec=codec)
        out[f"clip{i}{ext}"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
print(json.dumps(out))
"""


def test_write_video_bytes_hold_under_cpu_load(tmp_path):
    """Same frames, same bytes, even with the CPU oversubscribed: the reference encode runs
    alone, then two encodes run at once beside two busy processes (issue: `sora synth` gave
    other bytes for some clips on a loaded machine)."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(video_io.__file__)))
    env = dict(os.environ, PYTHONPATH=root)

    def encode(out: str) -> subprocess.Popen:
        os.makedirs(out)
        return subprocess.Popen([sys.executable, "-c", _ENCODE_SCRIPT, out], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    reference = encode(str(tmp_path / "alone"))
    want = json.loads(reference.communicate(timeout=300)[0])
    assert len(want) == 16 and len(set(want.values())) == 16
    # busy for as long as the encodes run (killed after them), at most 30 s whatever happens
    spin = "import time\nend = time.time() + 30\nwhile time.time() < end: pass\n"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        loaded = [encode(str(tmp_path / f"loaded{k}")) for k in range(2)]
        got = [json.loads(p.communicate(timeout=300)[0]) for p in loaded]
    finally:
        for p in busy:
            p.kill()
            p.wait()
    for run in got:
        assert run == want, sorted(k for k in want if run.get(k) != want[k])


def test_write_video_rejects_odd_sizes_and_unknown_containers(tmp_path):
    with pytest.raises(ValueError, match="even width and height"):
        write_video(str(tmp_path / "odd.mp4"), np.zeros((2, 64, 65, 3), np.uint8), 24)
    with pytest.raises(ValueError, match="container"):
        write_video(str(tmp_path / "clip.xyz"), np.zeros((2, 64, 64, 3), np.uint8), 24)
    path = str(tmp_path / "clip.bin")
    write_video(path, moving_box(64, 48), 24, container="mp4")
    assert probe(path).container == "mp4"


@pytest.mark.parametrize("writer, ext", [(write_gif, ".gif"), (write_webp, ".webp")])
def test_animated_previews(tmp_path, writer, ext):
    frames = moving_box(64, 48)
    path = str(tmp_path / f"preview{ext}")
    writer(path, frames, 10)
    with Image.open(path) as img:
        assert img.n_frames == T and img.size == (64, 48)
        for t in (0, 1, T - 1):
            img.seek(t)
            assert psnr(np.asarray(img.convert("RGB")), frames[t]) > 25
            assert img.info.get("duration") == 100  # ms per frame at 10 fps (set once seeked)


def test_s3_round_trip_on_loopback(loopback_s3):
    """s3:// through s3fs against moto's S3 server on 127.0.0.1 (endpoint from fsspec config,
    as FSSPEC_S3_ENDPOINT_URL would set it)."""
    frames = moving_box(96, 72)
    write_video(f"{loopback_s3}/in/clip ñ.mp4", frames, 24)
    info = probe(f"{loopback_s3}/in/clip ñ.mp4")
    assert (info.width, info.height, info.num_frames, info.codec) == (96, 72, T, "h264")
    assert psnr(read_frames(f"{loopback_s3}/in/clip ñ.mp4", [4])[0], frames[4]) > 35
    with pytest.raises(VideoError, match="no such file"):
        probe(f"{loopback_s3}/in/missing.mp4")


def test_decord_imported_first_gives_a_clear_error(tmp_path):
    """The FOOTGUN in video_io: decord loaded before av breaks PyAV's VP9 encoder; we say so."""
    code = ("import decord, numpy as np\n"
            "from sora.video_io import write_video\n"
            f"write_video({str(tmp_path / 'x.webm')!r}, np.zeros((2, 32, 32, 3), np.uint8), 24)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(video_io.__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=120)
    if done.returncode == 0:
        pytest.skip("this decord/av pair does not clash")
    assert "import sora.video_io first" in done.stderr, done.stderr[-2000:]
