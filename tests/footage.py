"""Real-looking test footage in the formats phones, cameras and the web write.

`scene` draws textured, moving content (a panning value-noise landscape with moving textured
objects, flicker and sensor grain; never black, so black-bar detection has a clear answer).
`write_clip` encodes frames with PyAV in any codec/container, with what real files carry: a
rotation in the mp4/mov track header (as phones write it), non-square pixels, variable frame
rate timestamps, audio, subtitle and data streams, an attached cover picture.
`build_corpus` writes one small file per case of `CORPUS` and returns the displayed content
aspect each must come out at.

Fault injection for the decode worker lives here too (`serve_with_faults`, `fault_worker`,
`fault_hook_dir`): a file whose name contains "hangs" makes the decoder hang and one with
"crashes" makes it segfault, so tests prove the deadline and crash isolation without any
test hook in production code.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

import sora.video_io  # noqa: F401  (imports av before decord: see the FOOTGUN in sora.video_io)
import av  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


# --------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------


def _value_noise(height: int, width: int, rng: np.random.Generator, scales=(48, 24, 12)) -> np.ndarray:
    """(H, W) float in [0, 1]: octaves of bicubically upsampled random grids (smooth texture)."""
    from PIL import Image

    out = np.zeros((height, width), np.float64)
    total = 0.0
    for k, s in enumerate(scales):
        grid = rng.random((height // s + 3, width // s + 3)).astype(np.float32)
        img = Image.fromarray(grid, mode="F").resize(((width // s + 3) * s, (height // s + 3) * s),
                                                     Image.Resampling.BICUBIC)
        weight = 0.5 ** k
        out += weight * np.asarray(img)[:height, :width]
        total += weight
    out /= total
    return np.clip((out - out.min()) / max(out.max() - out.min(), 1e-9), 0, 1)


def _hue_rotation(angle: float) -> np.ndarray:
    """3x3 matrix turning RGB colours by `angle` radians about the grey axis (Rodrigues)."""
    k = np.ones(3) / np.sqrt(3)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def scene(width: int, height: int, frames: int, seed: int = 0, *, speed: float = 1.5,
          times: np.ndarray | None = None, hue: float | None = None) -> np.ndarray:
    """(T, H, W, 3) uint8 real-looking footage: a camera panning over a textured landscape
    (sky to ground), two textured objects crossing it, a slow flicker and sensor grain. The
    seed also picks the palette (a hue turn), the horizon, the pan's direction and pace and the
    objects' paths, so two seeds look like two different shots.
    Brightness stays within about [35, 235]: no black pixels anywhere.
    times: per-frame time in frame units (default 0..T-1); motion follows it, so frames with
    uneven timestamps show uneven motion (variable frame rate). hue: the palette's turn in
    radians (default: drawn from the seed)."""
    rng = np.random.default_rng(seed)
    times = np.arange(frames, dtype=np.float64) if times is None else np.asarray(times, np.float64)
    pan = speed * rng.uniform(0.6, 1.4) * rng.choice([-1.0, 1.0])
    pad = 2 * int(np.ceil(abs(pan) * (times.max() + 2))) + 8
    tex = _value_noise(height + 8, width + pad, rng)
    detail = _value_noise(height + 8, width + pad, rng, scales=(6, 3))
    y = np.linspace(0, 1, height + 8)[:, None]
    sky = np.stack([0.45 + 0.2 * tex, 0.55 + 0.2 * tex, 0.8 + 0.15 * tex], -1)
    ground = np.stack([0.3 + 0.4 * tex, 0.45 + 0.3 * tex * (1 - detail), 0.2 + 0.25 * detail], -1)
    mix = np.clip((y - rng.uniform(0.3, 0.65)) * 6, 0, 1)[..., None]
    land = (1 - mix) * sky + mix * ground  # (H + 8, W + pad, 3) in about [0.2, 1]
    grey = land.mean(-1, keepdims=True)
    turn = rng.uniform(0, 2 * np.pi)
    land = grey + (land - grey) @ _hue_rotation(turn if hue is None else hue).T
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    blob_tex = _value_noise(height, width, rng, scales=(8, 4))
    blobs = [(rng.uniform(0.3, 1.0, 3), rng.uniform(0.1, 0.9), rng.uniform(0.3, 0.8),
              rng.uniform(-2.0, 2.0), rng.uniform(-0.5, 0.5)) for _ in range(2)]
    out = np.empty((len(times), height, width, 3), np.uint8)
    for i, t in enumerate(times):
        x0 = pad // 2 + int(round(pan * t))
        img = land[4:4 + height, x0:x0 + width].copy()
        for color, fx, fy, vx, vy in blobs:
            cx, cy = fx * width + vx * t, fy * height + vy * t
            r = 0.18 * min(width, height)
            inside = ((xx - cx) ** 2 + ((yy - cy) * 1.3) ** 2) < r * r
            img[inside] = color * (0.75 + 0.25 * blob_tex[inside, None])
        gain = 1.0 + 0.04 * np.sin(t / 3.0)
        grain = rng.normal(0, 0.008, img.shape)
        out[i] = np.clip((img * gain + grain) * 200 + 35, 35, 235).astype(np.uint8)
    return out


def letterbox(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre `frames` (T, h, w, 3) in a black width x height picture (bars top/bottom or
    left/right)."""
    T, h, w, _ = frames.shape
    out = np.zeros((T, height, width, 3), np.uint8)
    y0, x0 = (height - h) // 2, (width - w) // 2
    out[:, y0:y0 + h, x0:x0 + w] = frames
    return out


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font


def with_subtitle(frames: np.ndarray, text: str = "Where are you going tonight?") -> np.ndarray:
    """Burn a subtitle line into `frames`: white letters with a black outline, bottom centre,
    sized like a TV subtitle (about 1/13 of the frame height)."""
    from PIL import Image, ImageDraw

    out = []
    H, W = frames.shape[1:3]
    font = _font(max(10, H // 13))
    for f in frames:
        img = Image.fromarray(f)
        draw = ImageDraw.Draw(img)
        w = draw.textlength(text, font=font)
        draw.text(((W - w) / 2, H * 0.82), text, font=font, fill=(255, 255, 255),
                  stroke_width=max(1, H // 180), stroke_fill=(0, 0, 0))
        out.append(np.asarray(img))
    return np.stack(out)


def with_watermark(frames: np.ndarray, text: str = "STOCKCLIPS.COM") -> np.ndarray:
    """Blend a semi-transparent watermark into the top-right corner of `frames`."""
    from PIL import Image, ImageDraw

    out = []
    H, W = frames.shape[1:3]
    font = _font(max(10, H // 14))
    for f in frames:
        img = Image.fromarray(f).convert("RGBA")
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        w = draw.textlength(text, font=font)
        draw.text((W - w - W * 0.04, H * 0.05), text, font=font, fill=(255, 255, 255, 170))
        out.append(np.asarray(Image.alpha_composite(img, layer).convert("RGB")))
    return np.stack(out)


def squeeze(frames: np.ndarray, width: int) -> np.ndarray:
    """Resample (T, H, W, 3) horizontally to `width` (how anamorphic video stores its pixels)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((width, f.shape[0]), Image.Resampling.BICUBIC))
                     for f in frames])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_clip(path: str, frames: np.ndarray, fps: float = 24, *, codec: str = "libx264",
               fmt: str | None = None, pix_fmt: str = "yuv420p", options: dict | None = None,
               sar: Fraction | None = None, pts_ms: list[int] | None = None, audio: bool = False,
               subtitles: bool = False, data: bool = False, cover: bool = False) -> str:
    """Encode (T, H, W, 3) uint8 RGB to `path` with PyAV. pts_ms: per-frame timestamps in
    milliseconds (variable frame rate; the stream's time base becomes 1/1000)."""
    T, H, W, _ = frames.shape
    rate = Fraction(fps).limit_denominator(1001)
    srt = None
    if subtitles:
        srt_path = path + ".srt"
        with open(srt_path, "w") as f:
            f.write("1\n00:00:00,000 --> 00:00:00,400\nA subtitle line\n\n"
                    "2\n00:00:00,400 --> 00:00:00,800\nAnother line\n")
        srt = av.open(srt_path)
    try:
        with av.open(path, "w", format=fmt) as out:
            v = out.add_stream(codec, rate=rate)
            v.width, v.height, v.pix_fmt = W, H, pix_fmt
            if options:
                v.options = dict(options)
            if sar is not None:
                v.codec_context.sample_aspect_ratio = sar
            if pts_ms is not None:
                v.codec_context.time_base = Fraction(1, 1000)
            a = out.add_stream("aac", rate=16000) if audio else None
            s = out.add_stream_from_template(srt.streams.subtitles[0]) if srt else None
            d = out.add_data_stream() if data else None
            c = None
            if cover:
                c = out.add_stream("mjpeg")
                c.width, c.height, c.pix_fmt = 32, 32, "yuvj420p"
                c.disposition = av.stream.Disposition.attached_pic
            for t in range(T):
                frame = av.VideoFrame.from_ndarray(frames[t], format="rgb24").reformat(format=pix_fmt)
                frame.pts = t if pts_ms is None else int(pts_ms[t])
                if pts_ms is not None:
                    frame.time_base = Fraction(1, 1000)
                out.mux(v.encode(frame))
            out.mux(v.encode(None))
            if a is not None:
                n = int(16000 * T / float(rate))
                tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype(np.float32)[None]
                af = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                af.sample_rate, af.pts = 16000, 0
                out.mux(a.encode(af))
                out.mux(a.encode(None))
            if s is not None:
                for packet in srt.demux(srt.streams.subtitles[0]):
                    if packet.size:
                        packet.stream = s
                        out.mux(packet)
            if d is not None:
                for k in range(3):
                    packet = av.Packet(b"telemetry %d" % k)
                    packet.stream, packet.pts, packet.dts = d, k * 3000, k * 3000
                    packet.time_base = d.time_base or Fraction(1, 90000)
                    out.mux(packet)
            if c is not None:
                art = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 180, np.uint8), format="rgb24")
                art = art.reformat(format="yuvj420p")
                art.pts = 0
                out.mux(c.encode(art) + c.encode(None))
    finally:
        if srt is not None:
            srt.close()
            os.remove(srt.name)
    return path


# The display matrices phones write in the track header ('tkhd'), as 16.16 fixed point
# (a, b, u, c, d, v, x, y, w): the picture is turned clockwise by the key's degrees for display.
_TKHD_MATRIX = {90: (0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30),
                180: (-(1 << 16), 0, 0, 0, -(1 << 16), 0, 0, 0, 1 << 30),
                270: (0, -(1 << 16), 0, 1 << 16, 0, 0, 0, 0, 1 << 30)}


def set_mp4_rotation(path: str, clockwise: int) -> None:
    """Write a phone's rotation into the video track header of an mp4/mov, in place."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    i = data.find(b"tkhd")
    assert i > 0, f"{path}: no track header"
    offset = i + (56 if data[i + 4] == 1 else 44)  # version 1 has 64-bit times
    data[offset:offset + 36] = struct.pack(">9i", *_TKHD_MATRIX[clockwise])
    with open(path, "wb") as f:
        f.write(data)


def upright_to_stored(frames: np.ndarray, clockwise: int) -> np.ndarray:
    """The pixels a camera stores for an upright picture it will display turned `clockwise`."""
    return np.ascontiguousarray(np.rot90(frames, k=clockwise // 90, axes=(1, 2)))


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One corpus file: how it is written and what it must read as."""

    name: str
    aspect: float  # displayed content aspect (width / height) the clips must have
    decoder: str  # which decoder must read it
    write: object = field(repr=False)  # (path, seed) -> None


def _plain(codec: str, fmt: str | None = None, pix_fmt: str = "yuv420p", size=(128, 72),
           options: dict | None = None, fps: float = 24, frames: int = 12, **extra):
    def write(path: str, seed: int) -> None:
        write_clip(path, scene(*size, frames, seed), fps, codec=codec, fmt=fmt, pix_fmt=pix_fmt,
                   options=options, **extra)
    return write


def _phone(clockwise: int, size=(72, 128), **extra):
    """An upright picture of `size` stored turned, with the phone's rotation in the tkhd."""
    def write(path: str, seed: int) -> None:
        upright = scene(*size, 12, seed)
        write_clip(path, upright_to_stored(upright, clockwise), 30, audio=True, **extra)
        set_mp4_rotation(path, clockwise)
    return write


def _anamorphic(path: str, seed: int) -> None:
    """16:9 picture stored 96x72 with 4:3 pixels (DV/DVD style)."""
    write_clip(path, squeeze(scene(128, 72, 12, seed), 96), 25, sar=Fraction(4, 3))


VFR_PTS_MS = [0, 33, 66, 83, 116, 150, 200, 233, 266, 283, 316, 350, 400, 433, 466, 500]


def _vfr(path: str, seed: int) -> None:
    """A phone-style variable-frame-rate clip: mostly 33 ms steps, some 17 and 50 ms."""
    times = np.asarray(VFR_PTS_MS) / (1000 / 30)  # motion follows the timestamps
    write_clip(path, scene(128, 72, len(VFR_PTS_MS), seed, times=times), 30, fmt="matroska",
               pts_ms=VFR_PTS_MS)


def _letterboxed(path: str, seed: int) -> None:
    """A 2.39:1 picture (192x80) letterboxed inside 16:9 (192x108)."""
    write_clip(path, letterbox(scene(192, 80, 12, seed), 192, 108), 24)


def _pillarboxed(path: str, seed: int) -> None:
    """A 4:3 picture (96x72) pillarboxed inside 16:9 (128x72)."""
    write_clip(path, letterbox(scene(96, 72, 12, seed), 128, 72), 24, fmt="matroska")


X265 = {"x265-params": "log-level=error"}
SVT = {"svtav1-params": "log-level=0"}

CORPUS = [
    Case("phone_rot90.mp4", 72 / 128, "decord", _phone(90)),
    Case("phone_rot270.mov", 72 / 128, "decord", _phone(270, fmt="mov")),
    Case("phone_rot180.mp4", 128 / 72, "decord", _phone(180, size=(128, 72))),
    Case("h264_cover_art.mp4", 128 / 72, "decord", _plain("libx264", audio=True, cover=True)),
    Case("hevc.mkv", 1.0, "decord", _plain("libx265", size=(80, 80), options=X265, subtitles=True)),
    Case("hevc_10bit.mp4", 128 / 72, "decord", _plain("libx265", pix_fmt="yuv420p10le", options=X265)),
    Case("av1.mp4", 96 / 72, "pyav", _plain("libsvtav1", size=(96, 72), options=SVT)),
    Case("av1.webm", 128 / 72, "pyav", _plain("libsvtav1", options=SVT)),
    Case("vp9.webm", 72 / 128, "decord", _plain("libvpx-vp9", size=(72, 128))),
    Case("prores.mov", 96 / 72, "decord", _plain("prores_ks", pix_fmt="yuv422p10le", size=(96, 72))),
    Case("ffv1.mkv", 128 / 72, "decord", _plain("ffv1")),
    Case("mpeg2.mpg", 128 / 72, "decord", _plain("mpeg2video", fmt="mpeg", fps=25)),
    Case("mpeg2.ts", 128 / 72, "pyav", _plain("mpeg2video", fmt="mpegts", fps=25, audio=True, data=True)),
    Case("mjpeg.avi", 128 / 72, "decord", _plain("mjpeg", pix_fmt="yuvj420p")),
    Case("anamorphic.mp4", 128 / 72, "decord", _anamorphic),
    Case("vfr.mkv", 128 / 72, "decord", _vfr),
    Case("letterbox_239.mp4", 192 / 80, "decord", _letterboxed),
    Case("pillarbox_4x3.mkv", 96 / 72, "decord", _pillarboxed),
]


def build_corpus(root: str) -> dict[str, Case]:
    """Write every corpus file under `root`; returns {path: its Case}."""
    os.makedirs(root, exist_ok=True)
    made = {}
    for seed, case in enumerate(CORPUS):
        path = os.path.join(root, case.name)
        case.write(path, seed)
        made[path] = case
    return made


# --------------------------------------------------------------------------------------------
# Fault injection for the decode worker
# --------------------------------------------------------------------------------------------


def faulty(serve):
    """`serve` (a decode worker handler), except for files named "*hangs*" (sleeps like a
    decoder stuck in C code) and "*crashes*" (dies by SIGSEGV like a crashing decoder)."""
    def wrapped(job: dict):
        import signal
        import time

        name = os.path.basename(job.get("path", ""))
        if "hangs" in name:
            time.sleep(3600)
        if "crashes" in name:
            os.kill(os.getpid(), signal.SIGSEGV)
        return serve(job)
    return wrapped


def serve_with_faults(job: dict):
    """The decode worker's real handler with the faults of `faulty`."""
    from sora.video_decode import serve

    return faulty(serve)(job)


def fault_worker():
    """A decode worker running `serve_with_faults` (swap it in for `sora.video_io._WORKER`)."""
    from sora.video_worker import DecodeWorker

    return DecodeWorker(handler="footage:serve_with_faults", sys_path=[REPO, TESTS])


_HOOK = '''
"""Test-only: in every Python process started with this directory on PYTHONPATH, the decode
worker's handler gets the faults of tests/footage.py (files named *hangs* hang)."""
import importlib.abc
import importlib.util
import sys


class _FaultyDecoder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "sora.video_decode":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            sys.path.append({tests!r})
            import footage

            module.serve = footage.faulty(module.serve)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _FaultyDecoder())
'''


def fault_hook_dir(root: str) -> str:
    """A directory holding a sitecustomize.py that injects the faults of `faulty` into the
    decode worker of any process started with it first on PYTHONPATH (the CLI, its Ray
    workers and their decode workers)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "sitecustomize.py"), "w") as f:
        f.write(_HOOK.format(tests=TESTS))
    return root


# --------------------------------------------------------------------------------------------
# Shot transitions
# --------------------------------------------------------------------------------------------


def transition_video(kind: str, transitions: int, seed: int = 0, size: tuple[int, int] = (128, 72),
                     shot_frames: tuple[int, int] = (30, 60), span: tuple[int, int] = (8, 24)):
    """Shots of `scene` (a fresh seed each) joined by `transitions` transitions of one kind:
    "cut", "dissolve" (the shots cross-fade over 8-24 frames) or "fade" (out to black, then in,
    8-24 frames in all). Returns (frames (T, H, W, 3) uint8, [(start, end)] of each transition:
    the frames that belong to neither shot; a cut at frame c is (c, c))."""
    assert kind in ("cut", "dissolve", "fade"), kind
    rng = np.random.default_rng(seed)
    W, H = size
    parts, truth, at = [], [], 0
    # consecutive shots' palettes turn by the golden angle (at least ~100 degrees apart), as an
    # edit usually joins shots that look different
    hue = rng.uniform(0, 2 * np.pi)
    shot = scene(W, H, int(rng.integers(*shot_frames)), seed=seed * 1000, hue=hue)
    for k in range(transitions):
        hue += np.deg2rad(137.5)
        nxt = scene(W, H, int(rng.integers(*shot_frames)) + span[1], seed=seed * 1000 + k + 1, hue=hue)
        length = int(rng.integers(span[0], span[1] + 1))
        if kind == "cut":
            parts.append(shot)
            at += len(shot)
            truth.append((at, at))
        elif kind == "dissolve":
            a = np.linspace(0, 1, length + 2)[1:-1, None, None, None]  # strictly between the shots
            mixed = (shot[-length:] * (1 - a) + nxt[:length] * a).round().astype(np.uint8)
            parts += [shot[:-length], mixed]
            truth.append((at + len(shot) - length, at + len(shot)))
            at += len(shot)
            nxt = nxt[length:]
        else:
            out_len = length // 2
            down = np.linspace(1, 0, out_len + 1)[1:, None, None, None]  # ends on black
            up = np.linspace(0, 1, length - out_len + 1)[:-1, None, None, None]  # starts black
            faded = np.concatenate([(shot[-out_len:] * down).round(), (nxt[:length - out_len] * up).round()])
            parts += [shot[:-out_len], faded.astype(np.uint8)]
            truth.append((at + len(shot) - out_len, at + len(shot) - out_len + length))
            at += len(shot) - out_len + length
            nxt = nxt[length - out_len:]
        shot = nxt
    parts.append(shot)
    return np.concatenate(parts), truth


# --------------------------------------------------------------------------------------------
# A tiny CLIP model directory (random weights, the real save/load path)
# --------------------------------------------------------------------------------------------

CLIP_WORDS = ["a", "red", "ball", "over", "green", "field", "blue", "sky", "city", "at", "night"]


def tiny_clip_dir(d: str) -> str:
    """Write a tiny CLIPModel (random weights, seed 0), its image processor, a word-level
    tokenizer over CLIP_WORDS and a random aesthetic head into `d`; returns `d`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast

    from sora.curation.clip_scores import save_aesthetic_head

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(CLIP_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(d)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=3),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    torch.manual_seed(1)
    save_aesthetic_head(d, torch.randn(1, 16), torch.tensor([0.25]))
    return d
