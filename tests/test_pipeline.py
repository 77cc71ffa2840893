"""SoraPipeline: checkpoint round trip, exact sizes and lengths in every mode, determinism, and
given frames coming back where they belong (image-to-video, extend, join, loop, edit)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sora import conditioning as plans
from sora.pipeline import SoraPipeline, export_to_video
from tiny_model import moving_square, psnr

MODES = ("text-to-video", "image-to-video", "extend-forward", "extend-backward", "join", "loop", "edit", "draft")
# (width, height, frames): 16:9, 9:16, an odd 9:16, 2.39:1, 1:1, 4:3, 3:4 - none needs to be a
# multiple of 16 or a 4k+1 length
SIZES = [(64, 36, 6), (36, 64, 7), (100, 178, 6), (167, 70, 10), (48, 48, 11), (40, 30, 13), (30, 40, 8)]


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipe(model_dir):
    return SoraPipeline.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def clip():
    return moving_square(64, 48, 13)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------
# Checkpoints and determinism
# ----------------------------------------------------------------------------------------


def test_save_pretrained_round_trip_gives_identical_video(pipe, model_dir, tmp_path):
    pipe.save_pretrained(str(tmp_path / "copy"))
    assert sorted(os.listdir(tmp_path / "copy")) == ["dit", "model_index.json", "vae"]  # MiniLM stays a reference
    again = SoraPipeline.from_pretrained(str(tmp_path / "copy"))
    assert again.index == pipe.index
    for k, v in pipe.dit.state_dict().items():
        assert torch.equal(v, again.dit.state_dict()[k]), k
    a = pipe("a red circle moves left", generator=gen(3))
    b = again("a red circle moves left", generator=gen(3))
    assert a.frames.shape == (9, 32, 32, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames)


def test_same_seed_same_video_other_seed_other_video(pipe):
    kw = dict(width=48, height=32, num_frames=9, negative_prompt="blurry", sampler="heun", guidance_scale=3.0)
    a = pipe("a blue square moves up", generator=gen(1), **kw).frames
    b = pipe("a blue square moves up", generator=gen(1), **kw).frames
    c = pipe("a blue square moves up", generator=gen(2), **kw).frames
    d = pipe("a blue square moves up", generator=gen(1), **{**kw, "negative_prompt": None}).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)  # the negative prompt is the other CFG branch


def test_a_batch_equals_its_prompts_one_by_one(pipe):
    """Same-shape prompts go through one packed batch; with one generator per prompt each video
    is what that prompt alone would give (up to float summation order: +-1 of 255)."""
    prompts = ["a red circle", "a blue square moves up", "a green triangle"]
    batch = pipe(prompts, generator=[gen(i) for i in range(3)], width=48, height=32, num_frames=9)
    assert isinstance(batch.frames, list) and len(batch.frames) == 3
    for i, p in enumerate(prompts):
        alone = pipe(p, generator=gen(i), width=48, height=32, num_frames=9).frames
        assert np.abs(batch.frames[i].astype(int) - alone.astype(int)).max() <= 2


# ----------------------------------------------------------------------------------------
# Any size, any length, every mode
# ----------------------------------------------------------------------------------------


def _inputs(mode: str, clip: np.ndarray) -> dict:
    if mode in ("image-to-video",):
        return {"image": clip[0]}
    if mode in ("extend-forward", "extend-backward", "edit"):
        return {"video": clip}
    if mode == "join":
        return {"video": (clip, clip[::-1])}
    return {}


@pytest.mark.parametrize("width,height,num_frames", SIZES)
def test_every_mode_gives_exactly_the_requested_size_and_length(pipe, clip, width, height, num_frames):
    for mode in MODES:
        out = pipe("a red circle moves right", width=width, height=height, num_frames=num_frames, mode=mode,
                   generator=gen(0), **_inputs(mode, clip))
        assert out.frames.shape == (num_frames, height, width, 3), (mode, out.frames.shape)
        assert out.frames.dtype == np.uint8
        gw, gh = out.info["generated_size"]
        assert gw % 16 == 0 and gh % 16 == 0 and out.info["generated_frames"] % 4 == 1
        for g in out.info["given"]:
            assert all(0 <= o < num_frames for o in g["output_frames"]), (mode, g)


def test_layouts_keep_the_count_and_never_drop_given_frames():
    """The pure layout planner, over many lengths: exactly n frames kept, in order, and every
    frame of a known segment kept (a loop keeps one frame of its closing still group)."""
    video = np.zeros((21, 4, 4, 3), np.uint8)
    for n in range(1, 40):
        layouts = {"t2v": plans.text_to_video(n), "i2v": plans.image_to_video(video[:1], n), "edit": plans.edit(video, n)}
        if n > 1:
            layouts.update(fwd=plans.extend_forward(video, n), loop=plans.loop(video, n), loop1=plans.loop(video[:1], n))
        if n > 4:
            layouts["bwd"] = plans.extend_backward(video, n)
        if n > 5:
            layouts["join"] = plans.join(video, video, n)
        for name, lay in layouts.items():
            assert len(lay.keep) == n and lay.keep == sorted(set(lay.keep)), (name, n)
            assert lay.decoded_frames - n < 4 + plans.LOOP_SETTLE, (name, n)
            for seg in lay.segments:
                lo, hi = seg.pixel_range
                kept = [d for d in range(lo, hi) if d in lay.keep]
                assert len(kept) == (1 if seg.still_of_first else hi - lo), (name, n, seg.source)
            if name in ("fwd", "bwd", "join") or (name.startswith("loop") and n > 2):
                assert len(lay.known_latent_frames) < lay.latent_frames, (name, n)  # something is generated


@pytest.mark.parametrize("size", [(33, 17), (100, 178), (1920, 1080), (167, 70), (5, 3)])
def test_plan_size_is_a_stride_multiple_near_the_request(size):
    w, h = size
    gw, gh = plans.plan_size(w, h)
    assert gw % 16 == 0 and gh % 16 == 0 and gw >= 16 and gh >= 16
    if min(w, h) >= 48:
        assert abs(np.log((gw / gh) / (w / h))) < 0.1 and 0.6 < gw * gh / (w * h) < 1.6
    assert plans.plan_size(64, 48) == (64, 48)
    assert [plans.plan_frames(n) for n in (1, 2, 5, 6, 9)] == [1, 5, 5, 9, 9]


# ----------------------------------------------------------------------------------------
# Given frames come back (compared with their VAE round trip)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", [(48, 48), (100, 178)])
def test_image_to_video_starts_with_the_image(pipe, clip, width, height):
    out = pipe.image_to_video("a red square moves right", clip[0], width=width, height=height, num_frames=9,
                              generator=gen(0))
    reference = pipe.round_trip(clip[:1], width, height)
    assert psnr(out.frames[0], reference[0]) >= 28.0
    assert out.info["given"] == [{"source": "image", "output_frames": [0], "source_frames": [0]}]


def test_extend_forward_and_backward_keep_the_given_frames_in_place(pipe, clip):
    fwd = pipe.extend("a red square moves right", clip[:9], "forward", width=48, height=32, num_frames=14,
                      generator=gen(0))
    ref = pipe.round_trip(clip[:9], 48, 32)
    assert fwd.info["given"][0]["output_frames"] == list(range(9))  # the clip first, then 5 new frames
    assert psnr(fwd.frames[:9], ref) >= 28.0
    bwd = pipe.extend("a red square moves right", clip[:8], "backward", width=48, height=32, num_frames=14,
                      generator=gen(0))
    ref = pipe.round_trip(clip[:8], 48, 32, at_start=False)
    assert bwd.info["given"][0]["output_frames"] == list(range(6, 14))  # 6 new frames, then the clip
    assert psnr(bwd.frames[6:], ref) >= 28.0
    assert psnr(bwd.frames[:6], np.repeat(ref[:1], 6, axis=0)) < 28.0  # the new frames are not copies


def test_join_begins_like_the_end_of_a_and_ends_like_the_start_of_b(pipe, clip):
    a, b = clip, moving_square(64, 48, 13, color=(0, 255, 0), seed=1)
    out = pipe.join(a, b, "a square moves", width=64, height=48, num_frames=25, generator=gen(0))
    ga, gb = out.info["given"]
    assert ga["source"] == "a" and ga["output_frames"][0] == 0 and ga["source_frames"][-1] == len(a) - 1
    assert gb["source"] == "b" and gb["output_frames"][-1] == 24 and gb["source_frames"][0] == 0
    ref_a = pipe.round_trip(a[ga["source_frames"]], 64, 48)
    ref_b = pipe.round_trip(b[: len(gb["source_frames"])], 64, 48, at_start=False)
    assert psnr(out.frames[ga["output_frames"]], ref_a) >= 28.0
    assert psnr(out.frames[gb["output_frames"]], ref_b) >= 28.0
    middle = out.frames[ga["output_frames"][-1] + 1: gb["output_frames"][0]]
    assert len(middle) >= 8  # a generated transition between them


def test_loop_ends_on_its_first_frame(pipe, clip):
    out = pipe.loop("a red square", width=48, height=32, num_frames=12, generator=gen(0))
    assert np.array_equal(out.frames[0], out.frames[-1])
    assert not np.array_equal(out.frames[0], out.frames[6])
    with_image = pipe.loop("a red square", image=clip[0], width=48, height=32, num_frames=12, generator=gen(0))
    assert psnr(with_image.frames[0], pipe.round_trip(clip[:1], 48, 32)[0]) >= 28.0
    assert np.array_equal(with_image.frames[0], with_image.frames[-1])


def test_the_ancestral_sampler_is_seeded_per_prompt_and_euler_stays_the_default(pipe):
    kw = dict(width=48, height=32, num_frames=9)
    plain = pipe("a red circle", generator=gen(0), **kw)
    assert plain.info["sampler"] == "euler"
    a = pipe("a red circle", generator=gen(0), sampler="ancestral", **kw)
    assert a.info["sampler"] == "ancestral" and not np.array_equal(a.frames, plain.frames)
    assert np.array_equal(a.frames, pipe("a red circle", generator=gen(0), sampler="ancestral", **kw).frames)
    # step noise comes from each prompt's own generator: a batch equals its prompts one by one
    batch = pipe(["a blue square", "a red circle"], generator=[gen(5), gen(0)], sampler="ancestral", **kw)
    assert np.abs(batch.frames[1].astype(int) - a.frames.astype(int)).max() <= 2
    with pytest.raises(ValueError, match="sampler"):
        pipe("a red circle", sampler="ddim", **kw)


def test_edit_strength_zero_returns_the_round_trip_and_strength_changes_it(pipe, clip):
    ref = pipe.round_trip(clip, 48, 32)  # 13 frames
    same = pipe.edit("a blue square", clip, strength=0.0, width=48, height=32, num_frames=13, generator=gen(0))
    assert psnr(same.frames, ref) >= 40.0
    half = pipe.edit("a blue square", clip, strength=0.5, width=48, height=32, num_frames=13, generator=gen(0))
    full = pipe.edit("a blue square", clip, strength=1.0, width=48, height=32, num_frames=13, generator=gen(0))
    assert psnr(half.frames, ref) > psnr(full.frames, ref)  # less noise keeps more of the input
    assert pipe.edit("x", clip, width=48, height=32, generator=gen(0)).frames.shape[0] == len(clip)


def test_draft_then_refine_reports_both_stages(pipe):
    steps = []
    out = pipe.draft_and_refine("a red circle", strength=0.6, width=96, height=64, num_frames=9,
                                num_inference_steps=4, generator=gen(0), callback=lambda i, n, s: steps.append((s, i, n)))
    assert out.frames.shape == out.draft_frames.shape == (9, 64, 96, 3)
    assert [s for s in steps if s[0] == "draft"] == [("draft", i, 4) for i in range(1, 5)]
    refine = [s for s in steps if s[0] == "refine"]
    assert 1 <= len(refine) < 4 and refine[-1][1] == refine[-1][2]  # started part-way, at t = 0.6


# ----------------------------------------------------------------------------------------
# Output forms, time units, errors, export
# ----------------------------------------------------------------------------------------


def test_output_types_seconds_and_fps(pipe):
    np_out = pipe("a red circle", seconds=1.5, fps=6, width=40, height=30, generator=gen(0))
    assert np_out.frames.shape == (9, 30, 40, 3) and np_out.fps == 6.0
    pil = pipe("a red circle", seconds=1.5, fps=6, width=40, height=30, generator=gen(0), output_type="pil").frames
    assert len(pil) == 9 and pil[0].size == (40, 30) and np.array_equal(np.asarray(pil[4]), np_out.frames[4])
    pt = pipe("a red circle", seconds=1.5, fps=6, width=40, height=30, generator=gen(0), output_type="pt").frames
    assert pt.shape == (9, 3, 30, 40) and torch.allclose(pt * 255, torch.from_numpy(np_out.frames).permute(0, 3, 1, 2).float())


def test_bad_requests_raise_clear_errors(pipe, clip):
    with pytest.raises(ValueError, match="unknown mode"):
        pipe("x", mode="teleport")
    with pytest.raises(ValueError, match="needs video"):
        pipe("x", mode="extend-backward")
    with pytest.raises(ValueError, match="does not apply"):
        pipe("x", image=clip[0], video=clip, mode="edit")
    with pytest.raises(ValueError, match="num_frames must be > 5"):
        pipe.join(clip, clip, "x", num_frames=5)
    with pytest.raises(ValueError, match="not both"):
        pipe("x", num_frames=9, seconds=1.0)


def test_export_to_video_writes_a_playable_file(pipe, tmp_path):
    from sora.video_io import probe, read_frames

    out = pipe("a red circle", width=100, height=178, num_frames=10, generator=gen(0))
    path = export_to_video(out.frames, str(tmp_path / "v.mp4"), fps=out.fps)
    info = probe(path)
    assert (info.width, info.height, info.num_frames, info.fps) == (100, 178, 10, 8.0)
    # a random model's output is noise, which H.264 blurs; smooth frames survive nearly intact
    smooth = np.zeros((5, 36, 64, 3), np.uint8)
    smooth[:, :, :, 0] = np.linspace(0, 255, 64, dtype=np.uint8)
    for t in range(5):
        smooth[t, 10:26, 8 * t: 8 * t + 16] = (255, 255, 0)
    path = export_to_video([torch.from_numpy(f).permute(2, 0, 1) / 255.0 for f in smooth], str(tmp_path / "s.mp4"), fps=5)
    assert psnr(read_frames(path), smooth) > 30.0


def test_prompt_upsampler_rewrites_the_prompt_and_travels_with_the_model(model_dir, tmp_path):
    """A model directory with an upsampler/ (a random debug T5 here): upsample_prompt=True
    generates from its caption, and save_pretrained carries the upsampler along."""
    import shutil

    from sora.model_dir import read_index, write_index
    from sora.upsampler import PromptUpsampler, UpsamplerConfig, build_upsampler

    d = str(tmp_path / "with-upsampler")
    shutil.copytree(model_dir, d)
    torch.manual_seed(0)
    model, tok = build_upsampler(UpsamplerConfig.preset("debug"), ["a red circle moves left on black"])
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(os.path.join(d, "upsampler"))
    tok.save_pretrained(os.path.join(d, "upsampler"))
    index = read_index(d)
    index["upsampler"] = "upsampler"
    write_index(d, index)

    pipe = SoraPipeline.from_pretrained(d)
    with pytest.raises(ValueError, match="no prompt upsampler"):
        SoraPipeline.from_pretrained(model_dir)("red circle", upsample_prompt=True)
    caption = PromptUpsampler.from_pretrained(os.path.join(d, "upsampler")).upsample(["red circle"])[0]
    out = pipe("red circle", upsample_prompt=True, generator=gen(0))
    assert out.info["prompt"] == caption != "red circle"
    assert np.array_equal(out.frames, pipe(caption, generator=gen(0)).frames)
    pipe.save_pretrained(str(tmp_path / "copy"))
    again = SoraPipeline.from_pretrained(str(tmp_path / "copy"))
    assert again.upsample_prompts(["red circle"]) == [caption]


def test_generate_takes_requests_and_equals_the_call(pipe, clip, tmp_path):
    """`generate(requests)` is the call spelled as requests: seeds become generators, paths are
    read, a batch must share one shape key, and the call's own checks are the request's."""
    from sora.request import GenerationRequest

    path = str(tmp_path / "clip.mp4")
    export_to_video(clip, path, fps=8)
    reqs = [GenerationRequest("a red circle", width=48, height=32, num_frames=9, steps=2, seed=3),
            GenerationRequest("a blue square", width=48, height=32, num_frames=9, steps=2, seed=4, image=clip[0])]
    out = pipe.generate(reqs)
    assert [i["mode"] for i in out.info] == ["text-to-video", "image-to-video"]  # one batch, one layout
    call = pipe(["a red circle", "a blue square"], image=[None, clip[0]], width=48, height=32, num_frames=9,
                num_inference_steps=2, generator=[gen(3), gen(4)])
    assert all(np.array_equal(a, b) for a, b in zip(out.frames, call.frames))
    single = pipe.generate(GenerationRequest("a green square", mode="extend-forward", video=path, width=48,
                                             height=32, num_frames=13, steps=1, seed=0))
    assert single.frames.shape == (13, 32, 48, 3) and single.info["given"][0]["source"] == "video"
    joined = pipe(["a", "b"], video=(clip, clip[::-1]), mode="join", width=48, height=32, num_frames=13,
                  num_inference_steps=1, generator=[gen(0), gen(1)])  # one pair of arrays for the whole batch
    assert len(joined.frames) == 2 and joined.frames[0].shape == (13, 32, 48, 3)
    with pytest.raises(ValueError, match="share one shape_key"):
        pipe.generate([reqs[0], GenerationRequest("x", width=32, height=32, num_frames=9, steps=2)])
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1"):
        pipe("x", num_inference_steps=0)
