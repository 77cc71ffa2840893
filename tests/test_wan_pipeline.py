"""SoraPipeline on diffusers Wan directories: the same calls as for our model, checked against
diffusers' own WanPipeline (videos and LoRA adapters), every mode a TI2V model can do, refusals
before any work, and model directories at fsspec URLs.

The tiny random Wan directories (tests/wan_tiny.py) are built once per test session. Every
comparison runs float32 with one intra-op thread on both sides."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from sora.pipeline import SoraPipeline
from tiny_model import moving_square, psnr
from wan_tiny import build_tiny_lora, json_copy, still_image

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py
SIZE = {"t2v": (32, 32), "ti2v": (64, 64)}  # (H, W): one 2x2 token grid per latent frame for both
PROMPTS = ["a red circle moves left", "a large blue square moves up across a gray background"]


@pytest.fixture(scope="module")
def pipes(wan_dirs):
    return {f: SoraPipeline.from_pretrained(d) for f, d in wan_dirs.items()}


@pytest.fixture(scope="module")
def adapter(wan_dirs, tmp_path_factory):
    """A rank-4 alpha-8 adapter of the t2v model made with sora.wan_lora (tests/wan_tiny.py)."""
    return build_tiny_lora(str(tmp_path_factory.mktemp("lora") / "adapter"), wan_dirs["t2v"])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def diffusers_video(directory: str, prompts, H: int, W: int, seed: int, lora: str | None = None,
                    lora_scale: float = 1.0):
    """WanPipeline's (frames (B, T, H, W, 3) float in [0, 1], final latents) for the call the
    tests make of ours: 9 frames, 4 steps, guidance 3, one generator."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(directory, local_files_only=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
        pipe.set_adapters(pipe.get_active_adapters(), [lora_scale])
    seen = {}

    def keep_latents(p, i, t, kw):
        seen["latents"] = kw["latents"]
        return kw

    frames = pipe(prompts, height=H, width=W, num_frames=9, num_inference_steps=4, guidance_scale=3.0,
                  generator=gen(seed), output_type="np", callback_on_step_end=keep_latents).frames
    return frames, seen["latents"]


def assert_same_video(ours, frames, latents, vae) -> None:
    """Our output equals WanPipeline's: latents within 1e-4, the decoded float video within 1e-4,
    and our uint8 frames are that video rounded to 8 bits."""
    assert ours.latents.shape == latents.shape
    assert (ours.latents - latents).abs().max().item() <= 1e-4
    video = (vae.decode_latents(ours.latents) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()
    assert video.shape == frames.shape and np.abs(video - frames).max() <= 1e-4
    got = np.stack(ours.frames).astype(np.float64) / 255.0  # (B, T, H, W, 3)
    assert np.abs(got - frames).max() <= 0.5 / 255 + 1e-4


# ----------------------------------------------------------------------------------------
# Equal to diffusers
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["t2v", "ti2v"])
def test_text_to_video_equals_wan_pipeline(wan_dirs, pipes, flavour):
    """Same weights, prompts, seed (one generator for the batch on both sides), 4 steps of
    FlowMatchEulerDiscreteScheduler(shift=3) on the scheduler's own sigmas, guidance 3."""
    H, W = SIZE[flavour]
    pipe = pipes[flavour]
    ours = pipe(PROMPTS, height=H, width=W, num_frames=9, num_inference_steps=4, guidance_scale=3.0,
                generator=gen(11))
    frames, latents = diffusers_video(wan_dirs[flavour], PROMPTS, H, W, 11)
    assert_same_video(ours, frames, latents, pipe.vae)
    assert np.abs(frames[0] - frames[1]).max() > 1e-2  # two different videos, not a constant
    assert pipe.stride == (16 if flavour == "t2v" else 32)  # VAE x patch: what sizes are planned on
    assert ours.info[0]["generated_size"] == [W, H]


def test_a_lora_adapter_gives_wan_pipelines_video(wan_dirs, pipes, adapter):
    """An adapter from sora.wan_lora, loaded by our from_pretrained and by WanPipeline.load_lora_weights,
    at scale 1 and 0.5: the same videos; and not the base model's."""
    H, W = SIZE["t2v"]
    prompt = PROMPTS[:1]
    for scale in (1.0, 0.5):
        pipe = SoraPipeline.from_pretrained(wan_dirs["t2v"], lora=adapter, lora_scale=scale)
        assert pipe.index["lora"] == {"path": adapter, "scale": scale}
        ours = pipe(prompt, height=H, width=W, num_frames=9, num_inference_steps=4, guidance_scale=3.0,
                    generator=gen(4))
        frames, latents = diffusers_video(wan_dirs["t2v"], prompt, H, W, 4, lora=adapter, lora_scale=scale)
        assert_same_video(ours, frames, latents, pipe.vae)
    base = pipes["t2v"](prompt, height=H, width=W, num_frames=9, num_inference_steps=4, guidance_scale=3.0,
                        generator=gen(4))
    assert (base.latents - ours.latents).abs().max() > 1e-2


def test_a_directory_referencing_a_wan_base_and_its_adapter(wan_dirs, adapter, tmp_path):
    """What a LoRA fine-tune leaves: an index of ours that references the base instead of copying
    it, and its adapter - loaded as the base with that adapter."""
    from sora.model_dir import FORMAT, read_index

    out = tmp_path / "finetune"
    shutil.copytree(adapter, out / "lora")
    (out / "model_index.json").write_text(json.dumps({
        "format": FORMAT, "wan": {"base": wan_dirs["t2v"]}, "lora": {"path": "lora", "scale": 0.5},
        "defaults": {"fps": 8, "width": 32, "height": 32, "num_frames": 5, "num_inference_steps": 2,
                     "guidance_scale": 3.0}, "training": {"note": "written by hand, as a fine-tune would"}}))
    index = read_index(str(out))
    assert index["wan"]["base"] == wan_dirs["t2v"] and index["wan"]["expand_timesteps"] is False
    assert index["flow"]["scheduler"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"  # from the base
    pipe = SoraPipeline.from_pretrained(str(out))
    assert pipe.index["lora"] == {"path": str(out / "lora"), "scale": 0.5}
    direct = SoraPipeline.from_pretrained(wan_dirs["t2v"], lora=adapter, lora_scale=0.5)
    ours = pipe("a red circle moves left", generator=gen(2))  # the directory's own defaults
    assert ours.frames.shape == (5, 32, 32, 3) and ours.fps == 8.0
    assert np.array_equal(ours.frames, direct("a red circle moves left", width=32, height=32, num_frames=5,
                                              num_inference_steps=2, guidance_scale=3.0, generator=gen(2)).frames)
    with pytest.raises(ValueError, match="already applies the LoRA adapter"):
        SoraPipeline.from_pretrained(str(out), lora=adapter)


# ----------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------


def test_ti2v_image_to_video_starts_with_the_image(pipes):
    """As our DiT's test_image_to_video_starts_with_the_image: frame 0 is the image's VAE round trip."""
    pipe = pipes["ti2v"]
    H, W = SIZE["ti2v"]
    image = still_image(H, W)
    out = pipe.image_to_video("a red square stays still", image, width=W, height=H, num_frames=9,
                              num_inference_steps=4, generator=gen(0))
    assert psnr(out.frames[0], pipe.round_trip(image[None], W, H)[0]) >= 28.0
    pixels = torch.from_numpy(image).float().permute(2, 0, 1)[None, :, None] / 127.5 - 1.0
    assert torch.equal(out.latents[0, :, 0], pipe.vae.encode_latents(pixels)[0, :, 0])  # held clean, exactly
    assert out.info["given"] == [{"source": "image", "output_frames": [0], "source_frames": [0]}]
    assert psnr(out.frames[4], out.frames[0]) < 28.0  # the rest is generated, not the image repeated


def test_ti2v_extends_and_joins_keeping_the_given_frames(pipes):
    pipe = pipes["ti2v"]
    a, b = moving_square(64, 64, 9), moving_square(64, 64, 9, color=(0, 255, 0), seed=1)
    fwd = pipe.extend("a red square moves right", a, "forward", width=64, height=64, num_frames=13,
                      num_inference_steps=2, generator=gen(0))
    assert fwd.info["given"][0]["output_frames"] == list(range(9))
    assert psnr(fwd.frames[:9], pipe.round_trip(a, 64, 64)) >= 28.0
    joined = pipe.join(a, b, "a square moves", width=64, height=64, num_frames=21, num_inference_steps=2,
                       generator=gen(0))
    ga, gb = joined.info["given"]
    assert psnr(joined.frames[ga["output_frames"]], pipe.round_trip(a[ga["source_frames"]], 64, 64)) >= 28.0
    ref_b = pipe.round_trip(b[: len(gb["source_frames"])], 64, 64, at_start=False)
    assert psnr(joined.frames[gb["output_frames"]], ref_b) >= 28.0


def test_modes_a_t2v_model_cannot_do_are_refused_by_name_before_any_work(pipes, tmp_path):
    pipe = pipes["t2v"]
    missing = str(tmp_path / "not-there.mp4")  # refused on the mode, before the file is read
    image = still_image(32, 32)
    cases = {"image-to-video": dict(image=image), "extend-forward": dict(video=missing),
             "extend-backward": dict(video=missing), "join": dict(video=(missing, missing)), "loop": {},
             "draft": dict(image=image)}
    for mode, kw in cases.items():
        shown = "image-to-video" if mode == "draft" else mode
        with pytest.raises(ValueError, match=f"mode '{shown}' .*the Wan model at .*t2v.*: it supports "
                                             r"\['text-to-video', 'edit', 'draft'\]"):
            pipe("a red circle", mode=mode, width=32, height=32, num_frames=9, num_inference_steps=1, **kw)
    # SDEdit-style modes hold no frame clean: a one-timestep-per-video model runs them
    clip = moving_square(32, 32, 9)
    edit = pipe.edit("a red circle moves left", clip, strength=0.5, width=32, height=32, num_inference_steps=2,
                     generator=gen(0))
    assert edit.frames.shape == (9, 32, 32, 3) and edit.info["mode"] == "edit"
    draft = pipe.draft_and_refine("a red circle", width=32, height=32, num_frames=5, num_inference_steps=1,
                                  generator=gen(0))
    assert draft.frames.shape == (5, 32, 32, 3) and draft.draft_frames.shape == (5, 32, 32, 3)


# ----------------------------------------------------------------------------------------
# Bad directories and adapters: one clear error before any weights load
# ----------------------------------------------------------------------------------------


def test_other_architectures_and_foreign_adapters_fail_before_loading(wan_dirs, adapter, model_dir, tmp_path):
    from diffusers import WanTransformer3DModel

    from sora.wan import WanDenoiser
    from sora.wan_lora import add_lora, save_lora

    other = json_copy(wan_dirs["t2v"], str(tmp_path / "cog"))
    index = json.load(open(os.path.join(other, "model_index.json")))
    json.dump({**index, "_class_name": "CogVideoXPipeline"}, open(os.path.join(other, "model_index.json"), "w"))
    with pytest.raises(ValueError, match="CogVideoXPipeline .another architecture"):
        SoraPipeline.from_pretrained(other)

    # an adapter of a narrower Wan, against a directory holding no weights: refused on the adapter
    narrow = WanDenoiser(WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                               out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2),
                         name="a narrower Wan")
    add_lora(narrow, rank=2)
    save_lora(narrow, str(tmp_path / "narrow-lora"))
    weightless = json_copy(wan_dirs["t2v"], str(tmp_path / "weightless"))
    with pytest.raises(ValueError, match="made for another base model"):
        SoraPipeline.from_pretrained(weightless, lora=str(tmp_path / "narrow-lora"))
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        SoraPipeline.from_pretrained(weightless, lora=str(tmp_path))
    with pytest.raises(ValueError, match="not a Wan model directory"):
        SoraPipeline.from_pretrained(model_dir, lora=adapter)  # our DiT takes no Wan adapter
    with pytest.raises(ValueError, match="load that directory"):
        SoraPipeline.from_pretrained(wan_dirs["t2v"]).save_pretrained(str(tmp_path / "copy"))


# ----------------------------------------------------------------------------------------
# Model directories at URLs
# ----------------------------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch):
    """A loopback S3 (moto) with credentials for s3fs; a bucket name of this module's own."""
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("wan-pipeline-test")
    try:
        yield fs
    finally:
        server.stop()


def test_a_wan_directory_and_adapter_at_urls_are_fetched_once_then_loaded(wan_dirs, pipes, adapter, s3, tmp_path,
                                                                          monkeypatch):
    import fsspec

    from sora.model_dir import ModelSource

    s3.put(wan_dirs["t2v"], "wan-pipeline-test/models/wan", recursive=True)
    memory = fsspec.filesystem("memory")
    memory.put(adapter, "/wan-pipeline-test/adapter", recursive=True)
    cache = str(tmp_path / "cache")
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2)
    try:
        pipe = SoraPipeline.from_pretrained("s3://wan-pipeline-test/models/wan", cache_dir=cache)
        assert pipe.source_dir.startswith(cache) and pipe.index["wan"]["base"] == pipe.source_dir
        assert np.array_equal(pipe("a red circle", generator=gen(1), **kw).frames,
                              pipes["t2v"]("a red circle", generator=gen(1), **kw).frames)
        again = SoraPipeline.from_pretrained("s3://wan-pipeline-test/models/wan", cache_dir=cache,
                                             lora="memory://wan-pipeline-test/adapter")
        assert again.source_dir == pipe.source_dir and len(os.listdir(cache)) == 2  # model once, adapter once
        local = SoraPipeline.from_pretrained(wan_dirs["t2v"], lora=adapter)
        assert np.array_equal(again("a red circle", generator=gen(1), **kw).frames,
                              local("a red circle", generator=gen(1), **kw).frames)
        with pytest.raises(FileNotFoundError, match="no such directory"):
            SoraPipeline.from_pretrained("s3://wan-pipeline-test/models/nothing", cache_dir=cache)

        # what the commands check before loading: the model's JSON files alone, and the adapter
        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default cache, ~/.cache/sora-ray/models
        ModelSource("s3://wan-pipeline-test/models/wan", "memory://wan-pipeline-test/adapter").check()
        fetched = [f for _, _, files in os.walk(tmp_path / "home") for f in files]
        assert "model_index.json" in fetched and all(f.endswith(".json") or "lora" in f for f in fetched), fetched
        with pytest.raises(FileNotFoundError, match="no such directory"):
            ModelSource("s3://wan-pipeline-test/models/nothing").check()
    finally:
        memory.rm("/wan-pipeline-test", recursive=True)
