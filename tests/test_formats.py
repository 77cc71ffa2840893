"""Footage as phones, cameras and the web write it (tests/footage.py): every codec and container,
rotation tags, non-square pixels, variable frame rate, extra streams, black bars. Each file
probes and decodes as displayed, and ingest turns it into clips at its content's aspect."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from footage import CORPUS, VFR_PTS_MS, build_corpus, scene, squeeze, write_clip
from pipelines.ingest import IngestConfig, read_clips, read_quarantine, run_sequential
from sora.video_io import VideoError, probe, read_frames

SEED = {case.name: seed for seed, case in enumerate(CORPUS)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("footage"))
    return {os.path.basename(p): p for p in build_corpus(root)}


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_every_format_probes_and_decodes(corpus, case):
    path = corpus[case.name]
    info = probe(path)
    assert info.decoder == case.decoder, info
    frames = read_frames(path)
    assert frames.shape == (info.num_frames, info.height, info.width, 3)
    assert info.num_frames >= 12
    # Every frame is a real picture of the scene (never black or garbage): the content is
    # bright everywhere outside bars, and the picture moves (the camera pans; a low-bitrate codec
    # may repeat a frame, variable frame rate resampling shows some frames twice).
    assert frames.mean() > 40
    moving = sum(np.abs(frames[t + 1].astype(int) - frames[t]).mean() > 0.3 for t in range(len(frames) - 1))
    assert moving >= len(frames) - 3 - (3 if info.vfr else 0)
    assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 2
    # Random access agrees with the full decode.
    picked = read_frames(path, [5, 0, 5])
    assert all(psnr(picked[k], frames[t]) > 45 for k, t in enumerate([5, 0, 5]))


def test_codecs_and_containers_are_named(corpus):
    named = {name: (probe(p).codec, probe(p).container) for name, p in corpus.items()}
    assert named["av1.mp4"] == ("av1", "mp4") and named["av1.webm"] == ("av1", "webm")
    assert named["hevc_10bit.mp4"][0] == named["hevc.mkv"][0] == "hevc"
    assert probe(corpus["hevc_10bit.mp4"]).pix_fmt == "yuv420p10le"
    assert named["prores.mov"] == ("prores", "mov") and named["ffv1.mkv"] == ("ffv1", "matroska")
    assert named["mpeg2.mpg"] == ("mpeg2video", "mpeg") and named["mpeg2.ts"] == ("mpeg2video", "mpegts")
    assert named["mjpeg.avi"] == ("mjpeg", "avi") and named["vp9.webm"] == ("vp9", "webm")


@pytest.mark.parametrize("name, clockwise", [("phone_rot90.mp4", 90), ("phone_rot270.mov", 270),
                                             ("phone_rot180.mp4", 180)])
def test_phone_rotation_gives_upright_frames(corpus, name, clockwise):
    path = corpus[name]
    with open(path, "rb") as f:
        data = f.read()
    i = data.find(b"tkhd")
    a, b, _, c, d = struct.unpack(">5i", data[i + 44:i + 64])
    # The track header holds the matrix phones write (16.16 fixed point): 90 degrees clockwise
    # is (a, b, c, d) = (0, 1, -1, 0).
    assert (a, b, c, d) == {90: (0, 1 << 16, -(1 << 16), 0), 270: (0, -(1 << 16), 1 << 16, 0),
                            180: (-(1 << 16), 0, 0, -(1 << 16))}[clockwise]
    info = probe(path)
    upright = scene(72, 128, 12, SEED[name]) if clockwise != 180 else scene(128, 72, 12, SEED[name])
    assert (info.width, info.height) == (upright.shape[2], upright.shape[1])
    assert (info.coded_width, info.coded_height) == ((128, 72) if clockwise != 180 else (128, 72))
    assert info.rotation == clockwise
    frames = read_frames(path)
    assert min(psnr(frames[t], upright[t]) for t in range(12)) > 28
    # Turned the other way, the picture would not match: the test tells the directions apart.
    assert psnr(frames[0], np.rot90(upright[0], 2)) < 20


def test_pyav_path_agrees_with_decord_on_rotation(corpus):
    """Both decoders give the same upright frames: decord applies the tag itself, PyAV's frames
    are turned by us."""
    from sora.video_decode import inspect, read

    for name in ("phone_rot90.mp4", "phone_rot270.mov", "phone_rot180.mp4", "vfr.mkv"):
        src, reader = inspect(corpus[name])
        assert reader is not None
        fast = read(src, reader, None)
        slow = read(src, None, None)
        assert fast.shape == slow.shape
        assert min(psnr(x, y) for x, y in zip(fast, slow)) > 35, name


def test_anamorphic_pixels_give_the_display_aspect(corpus):
    info = probe(corpus["anamorphic.mp4"])
    assert (info.coded_width, info.coded_height, info.sample_aspect) == (96, 72, pytest.approx(4 / 3))
    assert (info.width, info.height) == (128, 72)
    frames = read_frames(corpus["anamorphic.mp4"])
    original = scene(128, 72, 12, SEED["anamorphic.mp4"])
    assert min(psnr(frames[t], original[t]) for t in range(12)) > 27
    # A resize goes straight from the stored pixels to the asked size, keeping the aspect.
    assert read_frames(corpus["anamorphic.mp4"], [0], size=(64, 36)).shape == (1, 36, 64, 3)


def test_variable_frame_rate_is_resampled_on_timestamps(corpus):
    info = probe(corpus["vfr.mkv"])
    span = (VFR_PTS_MS[-1] - VFR_PTS_MS[0]) / 1000
    assert info.vfr and info.fps == pytest.approx((len(VFR_PTS_MS) - 1) / span)  # 30 fps real
    assert info.num_frames == len(VFR_PTS_MS)
    times = np.asarray(VFR_PTS_MS) / (1000 / 30)
    source = scene(128, 72, len(VFR_PTS_MS), SEED["vfr.mkv"], times=times)
    frames = read_frames(corpus["vfr.mkv"])
    t_src = np.asarray(VFR_PTS_MS) / 1000
    for i, frame in enumerate(frames):
        want = int(np.argmin(np.abs(t_src - i / info.fps)))  # the frame on screen at i / fps
        got = int(np.argmax([psnr(frame, s) for s in source]))
        assert got == want, (i, got, want)
    assert len({int(np.argmin(np.abs(t_src - i / info.fps))) for i in range(len(frames))}) < len(frames), \
        "the timestamps must make the resampling repeat or drop a frame (else this tests nothing)"


def test_file_without_a_video_stream_names_what_it_holds(tmp_path):
    """An audio file with cover art has a "video" stream that is only a picture: no video."""
    import av

    path = str(tmp_path / "song.m4a")
    with av.open(path, "w", format="mp4") as out:
        a = out.add_stream("aac", rate=16000)
        c = out.add_stream("mjpeg")
        c.width, c.height, c.pix_fmt = 32, 32, "yuvj420p"
        c.disposition = av.stream.Disposition.attached_pic
        tone = np.zeros((1, 8000), np.float32)
        af = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        af.sample_rate, af.pts = 16000, 0
        out.mux(a.encode(af) + a.encode(None))
        art = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 99, np.uint8)).reformat(format="yuvj420p")
        art.pts = 0
        out.mux(c.encode(art) + c.encode(None))
    with pytest.raises(VideoError) as err:
        probe(path)
    assert err.value.reason == "not a video: no video stream (found 1 audio, an attached cover picture)"


def test_crop_reads_the_content_box(corpus):
    frames = read_frames(corpus["letterbox_239.mp4"], [3], crop=(0, 14, 192, 94))
    assert frames.shape == (1, 80, 192, 3)
    assert frames.mean() > 40 and frames[0, 0].mean() > 40 and frames[0, -1].mean() > 40  # no bar left
    small = read_frames(corpus["letterbox_239.mp4"], [3], crop=(0, 14, 192, 94), size=(96, 40))
    assert small.shape == (1, 40, 96, 3)
    with pytest.raises(ValueError, match="outside"):
        read_frames(corpus["letterbox_239.mp4"], [3], crop=(0, 0, 300, 94))


def test_ingest_every_format_at_its_content_aspect(corpus, tmp_path):
    """The acceptance: every file becomes clips at its displayed content aspect (within 3%),
    none is quarantined, the decoder and the content box are recorded per clip."""
    root = os.path.dirname(next(iter(corpus.values())))
    data = str(tmp_path / "ds")
    summary = run_sequential([root], data, IngestConfig())
    clips = read_clips(data).to_pylist()
    quarantine = read_quarantine(data).to_pylist()
    assert quarantine == [], quarantine
    by_name = {}
    for clip in clips:
        by_name.setdefault(os.path.basename(clip["source"]), []).append(clip)
    assert set(by_name) == {case.name for case in CORPUS}
    assert summary["sources_with_clips"] == len(CORPUS)
    for case in CORPUS:
        for clip in by_name[case.name]:
            content = clip["crop_width"] / clip["crop_height"]
            assert content == pytest.approx(case.aspect, rel=0.03), (case.name, clip)
            bucket = clip["bucket_width"] / clip["bucket_height"]
            assert bucket == pytest.approx(case.aspect, rel=0.1), (case.name, clip)
            assert clip["decoder"] == case.decoder, (case.name, clip["decoder"])
            framed = (clip["crop_x"], clip["crop_y"], clip["crop_width"], clip["crop_height"])
            if "box" not in case.name:  # no bars: the content is the whole picture
                assert framed == (0, 0, clip["width"], clip["height"]), (case.name, framed)
    letterboxed = by_name["letterbox_239.mp4"][0]
    assert (letterboxed["width"], letterboxed["height"]) == (192, 108)
    assert (letterboxed["crop_y"], letterboxed["crop_height"]) == (14, 80)
    pillarboxed = by_name["pillarbox_4x3.mkv"][0]
    assert (pillarboxed["crop_x"], pillarboxed["crop_width"]) == (16, 96)


def test_every_stage_that_decodes_a_clip_reads_only_its_content_box(corpus, model_dir, tmp_path, monkeypatch):
    """Caption, the captioner's training data, VAE training and encode decode a letterboxed clip
    inside its content box (the bucket's aspect): no black rows; a clip without a box (older
    datasets, or no bars) is decoded whole."""
    from pipelines.caption import CaptionConfig, CaptionStage
    from pipelines.clips import content_crop, content_size
    from pipelines.train_captioner import clip_frames
    from pipelines.train_vae import load_clip_frames
    from sora.video_io import read_frames

    data = str(tmp_path / "ds")
    run_sequential([corpus["letterbox_239.mp4"]], data, IngestConfig())
    clip = read_clips(data).to_pylist()[0]
    box = content_crop(clip)
    assert box == (0, 14, 192, 94) and content_size(clip) == (192, 80)
    stage = CaptionStage.__new__(CaptionStage)  # its decode step only: no captioner loaded
    stage.cfg = CaptionConfig()
    bucket = [clip["start_frame"] + i for i in range(clip["bucket_frames"])]
    decoded = {
        "caption": stage.frames(clip),
        "train-captioner": clip_frames(clip),
        "train-vae": load_clip_frames([clip])[0],
    }
    for name, frames in decoded.items():
        assert abs(frames.shape[2] / frames.shape[1] - 192 / 80) < 0.1, (name, frames.shape)
        rows = frames.astype(float).mean(axis=(0, 2, 3))  # mean level of each row
        assert rows[0] > 30 and rows[-1] > 30, (name, rows[:3], rows[-3:])  # the bars are not in the picture
    expected = read_frames(clip["source"], bucket, size=(clip["bucket_width"], clip["bucket_height"]), crop=box)
    assert np.array_equal(decoded["train-vae"], expected)
    # encode: the frames the VAE gets are the content box at the bucket size
    import sora.video_io
    from pipelines.encode import EncodeConfig, EncodeStage

    seen = []

    def recording(*args, **kwargs):
        frames = read_frames(*args, **kwargs)
        seen.append((kwargs.get("crop"), frames))
        return frames

    monkeypatch.setattr(sora.video_io, "read_frames", recording)
    row = EncodeStage(EncodeConfig(model=model_dir)).encode_clip(clip, "a test")
    assert seen[0][0] == box and np.array_equal(seen[0][1], expected)
    assert (row["width"], row["height"]) == (clip["bucket_width"], clip["bucket_height"]) and row["tokens"]
    for unknown in ({"crop_x": None}, {"crop_x": float("nan")}):
        assert content_crop({**clip, **unknown}) is None and content_size({**clip, **unknown}) == (192, 108)
    assert content_crop({**clip, "crop_y": 0, "crop_height": 108}) is None  # the whole picture


def test_old_datasets_read_new_columns_as_null(tmp_path):
    """Clips written before the decoder/crop columns existed still read, the new columns null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.ingest import CLIPS_SCHEMA

    added = ("decoder", "crop_x", "crop_y", "crop_width", "crop_height", "shot_detector", "text_area",
             "aesthetic", "signature", "bit_rate")
    old = pa.schema([f for f in CLIPS_SCHEMA if f.name not in added])
    row = {"clip_id": "c", "source": "s.mp4", "start_frame": 0, "num_frames": 9, "fps": 8.0,
           "width": 64, "height": 64, "bucket": "b", "bucket_width": 64, "bucket_height": 64,
           "bucket_frames": 9, "resolution": "64p", "motion_score": 0.1, "codec": "h264",
           "container": "mp4"}
    os.makedirs(tmp_path / "ds" / "clips")
    pq.write_table(pa.Table.from_pylist([row], schema=old), str(tmp_path / "ds" / "clips" / "x.parquet"))
    got = read_clips(str(tmp_path / "ds")).to_pylist()
    assert got == [{**row, **{name: None for name in added}}]


def test_squeeze_and_write_round_trip_are_what_the_corpus_claims(tmp_path):
    """The corpus helpers themselves: a squeezed picture written with 4:3 pixels carries them."""
    path = write_clip(str(tmp_path / "a.mkv"), squeeze(scene(64, 36, 4), 48), 12, fmt="matroska",
                      sar=__import__("fractions").Fraction(4, 3))
    info = probe(path)
    assert (info.coded_width, info.width, info.height) == (48, 64, 36)


def test_a_stream_no_decoder_reads_is_rejected_with_both_reasons(tmp_path):
    """A valid container whose video data is garbage: decord and PyAV both fail, and the
    reason says so in words (no C++ locations)."""
    from sora.video_io import write_video

    path = str(tmp_path / "garbled.mp4")
    write_video(path, scene(128, 72, 12), 24)  # index first, so the container still opens
    data = bytearray(open(path, "rb").read())
    at = data.find(b"mdat") + 4
    data[at:] = np.random.default_rng(0).integers(0, 256, len(data) - at, dtype=np.uint8).tobytes()
    open(path, "wb").write(bytes(data))
    with pytest.raises(VideoError) as err:
        probe(path)
    reason = err.value.reason
    assert reason.startswith("corrupt video: no decoder can read it (decord: ") and "PyAV: " in reason
    assert ".cc:" not in reason and len(reason) < 300


@pytest.mark.parametrize("name, codec, fmt, options", [
    ("long.ts", "mpeg2video", "mpegts", {"g": "8"}),
    ("long_av1.mkv", "libsvtav1", "matroska", {"svtav1-params": "log-level=0:keyint=8"}),
])
def test_pyav_random_access_matches_a_full_decode(tmp_path, name, codec, fmt, options):
    """The PyAV path seeks to the key frame before the first asked frame; what it returns
    equals a decode from the start, in any order asked."""
    path = write_clip(str(tmp_path / name), scene(96, 64, 40, seed=9), 25, codec=codec, fmt=fmt,
                      options=options)
    assert probe(path).decoder == "pyav"
    full = read_frames(path)
    assert full.shape == (40, 64, 96, 3)
    for asked in ([37, 21, 21, 39, 26], [3, 0], [12]):  # past key frames, from the start, one
        for got, t in zip(read_frames(path, asked), asked):
            assert psnr(got, full[t]) > 45, (asked, t)
