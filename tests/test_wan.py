"""A Wan-family diffusers directory behind our denoiser protocol, checked against diffusers itself.

Tiny random Wan 2.1 T2V-style and Wan 2.2 TI2V-style directories (tests/wan_tiny.py) are written
with WanPipeline.save_pretrained and loaded through the real from_pretrained paths, offline.
Every comparison runs float32 with one intra-op thread on both sides."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from sora.denoiser import MODE_CONDITIONING, Denoiser, spec_of
from sora.flow import CONDITIONING_MODES, FlowConfig, flow_matching_loss, sample_logit_normal, shift_timesteps
from sora.packing import Sample, pack
from sora.patches import patchify, position_ids, unpatchify
from sora.wan import TEXT_LEN, flow_match_grid, inspect_wan_dir, is_wan_dir, load_wan
from wan_tiny import json_copy, sora_generate, still_image

SIZE = {"t2v": (32, 32), "ti2v": (64, 64)}  # (H, W): one 2x2 token grid per latent frame for both


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(wan_dirs):
    return {f: load_wan(d) for f, d in wan_dirs.items()}


@pytest.fixture(scope="module")
def pipes(wan_dirs):
    from diffusers import WanPipeline

    return {f: WanPipeline.from_pretrained(d, local_files_only=True) for f, d in wan_dirs.items()}


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _diffusers_text(pipe, prompts):
    """WanPipeline's own prompt states (B, 512, D): its tokenizer settings, cleaning and padding
    (under no_grad, as WanPipeline.__call__: autograd mode changes UMT5's kernels in the last bits)."""
    with torch.no_grad():
        states, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)
    return states


# ----------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------


def test_dit_and_wan_are_denoisers_with_specs(models):
    from sora.dit import DiT, DiTConfig

    dit = DiT(DiTConfig(in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=24))
    assert isinstance(dit, Denoiser)
    spec = spec_of(dit)
    assert (spec.patch_size, spec.latent_channels, spec.text_dim, spec.text_len) == ((1, 2, 2), 4, 24, None)
    assert spec.packed and spec.conditioning_modes == CONDITIONING_MODES
    assert spec.generation_modes() == tuple(MODE_CONDITIONING)

    t2v, ti2v = spec_of(models["t2v"].denoiser), spec_of(models["ti2v"].denoiser)
    assert isinstance(models["t2v"].denoiser, Denoiser)
    assert (t2v.patch_size, t2v.latent_channels, t2v.text_dim, t2v.text_len) == ((1, 2, 2), 16, 32, 512)
    assert (ti2v.latent_channels, ti2v.packed) == (48, False)
    assert t2v.generation_modes() == ("text-to-video", "edit", "draft")
    assert ti2v.generation_modes() == tuple(MODE_CONDITIONING)
    assert (models["t2v"].vae.latent_channels, models["t2v"].vae.spatial_compression) == (16, 8)
    assert (models["ti2v"].vae.latent_channels, models["ti2v"].vae.spatial_compression) == (48, 16)
    with pytest.raises(TypeError, match="not a denoiser"):
        spec_of(torch.nn.Linear(2, 2))
    # what the trainer's parallelize() touches on our DiT works the same on the wrapper
    den = models["t2v"].denoiser
    assert den.blocks is den.transformer.blocks and len(den.blocks) == 2
    den.gradient_checkpointing = True
    assert den.transformer.gradient_checkpointing and den.gradient_checkpointing
    den.gradient_checkpointing = False
    assert not den.transformer.gradient_checkpointing


def test_a_mode_the_model_cannot_do_is_refused_by_name(models):
    spec = spec_of(models["t2v"].denoiser)
    for mode in ("image-to-video", "extend-forward", "join", "loop"):
        with pytest.raises(ValueError, match=f"mode '{mode}'.*{re.escape(models['t2v'].path)}"):
            spec.check_generation_mode(mode)
    spec.check_generation_mode("edit")  # SDEdit needs no clean frames
    spec_of(models["ti2v"].denoiser).check_generation_mode("join")
    with pytest.raises(ValueError, match=r"\['first'\] are not supported"):
        spec.check_conditioning({"none": 0.8, "first": 0.2})
    spec.check_conditioning({"none": 1.0, "first": 0.0})
    # and the model itself refuses clean tokens inside a noisy video
    x, (T, h, w) = torch.randn(12, 64), (3, 2, 2)
    t = torch.full((12,), 0.5)
    t[:4] = 0.0
    text, mask = models["t2v"].text_encoder.encode(["a red circle"])
    with pytest.raises(ValueError, match="one timestep per video"):
        models["t2v"].denoiser(x, position_ids((T, h, w)), t, torch.zeros(12, dtype=torch.long), text, mask)


# ----------------------------------------------------------------------------------------
# (a) one forward equals diffusers' transformer
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["t2v", "ti2v"])
def test_velocity_equals_the_diffusers_transformer(models, pipes, flavour):
    model, pipe = models[flavour], pipes[flavour]
    den, tr = model.denoiser, pipe.transformer
    C, p = den.config.in_channels, (1, 2, 2)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, C, 3, 4, 6, generator=g)  # (B, C, T, h, w): grid (3, 2, 3)
    grid, N = (3, 2, 3), 18
    t = torch.tensor([0.9, 0.37, 0.05])
    prompts = ["a red circle moves left", "the  small cyan square &amp; stays still", ""]
    text, mask = model.text_encoder.encode(prompts)
    mask[2] = False  # the third video unconditional: Wan's empty prompt, as in WanPipeline's CFG
    x = torch.cat([patchify(z, p) for z in latents])  # (B*N, D_in)
    positions, seq_ids = position_ids(grid).repeat(3, 1), torch.arange(3).repeat_interleave(N)
    with torch.no_grad():
        ours = den(x, positions, t.repeat_interleave(N), seq_ids, text, mask)  # (B*N, D_in)
        ts = t * 1000 if flavour == "t2v" else (t * 1000)[:, None].expand(3, N)
        ref = tr(hidden_states=latents, timestep=ts, encoder_hidden_states=_diffusers_text(pipe, prompts),
                 return_dict=False)[0]  # (B, C, T, h, w)
    got = torch.stack([unpatchify(ours[b * N:(b + 1) * N], grid, p, C) for b in range(3)])
    assert (got - ref).abs().max().item() <= 1e-5 and ref.abs().max() > 0.1

    # a pack of two shapes runs as one Wan batch per shape, each equal to its own call
    small = torch.randn(1, C, 2, 2, 2, generator=g)  # grid (2, 1, 1)
    x2 = torch.cat([patchify(small[0], p), x[:N]])
    pos2 = torch.cat([position_ids((2, 1, 1)), position_ids(grid)])
    with torch.no_grad():
        mixed = den(x2, pos2, torch.tensor([0.6] * 2 + [0.9] * N), torch.tensor([0, 0] + [1] * N), text[:2], mask[:2])
        ref_small = tr(hidden_states=small, timestep=torch.tensor([600.0]) if flavour == "t2v" else
                       torch.full((1, 2), 600.0), encoder_hidden_states=_diffusers_text(pipe, prompts[:1]),
                       return_dict=False)[0]
        one = den(x[:N], position_ids(grid), torch.full((N,), 0.9), torch.zeros(N, dtype=torch.long), text[1:2],
                  mask[1:2])
    assert (unpatchify(mixed[:2], (2, 1, 1), p, C) - ref_small[0]).abs().max().item() <= 1e-5
    assert (mixed[2:] - one).abs().max().item() <= 1e-5


def test_per_token_timesteps_equal_the_diffusers_transformer(models, pipes):
    """TI2V: a clean first latent frame at t = 0 is Wan 2.2's per-token timestep 0."""
    den, tr = models["ti2v"].denoiser, pipes["ti2v"].transformer
    latents = torch.randn(2, 48, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    grid, N = (3, 2, 2), 12
    t = torch.tensor([0.8, 0.3]).repeat_interleave(N).reshape(2, N)
    t[:, :4] = 0.0  # first latent frame clean
    prompts = ["a red circle moves left", "a blue square"]
    text, mask = models["ti2v"].text_encoder.encode(prompts)
    with torch.no_grad():
        ours = den(torch.cat([patchify(z, (1, 2, 2)) for z in latents]), position_ids(grid).repeat(2, 1),
                   t.reshape(-1), torch.arange(2).repeat_interleave(N), text, mask)
        ref = tr(hidden_states=latents, timestep=t * 1000,
                 encoder_hidden_states=_diffusers_text(pipes["ti2v"], prompts), return_dict=False)[0]
    got = torch.stack([unpatchify(ours[b * N:(b + 1) * N], grid, (1, 2, 2), 48) for b in range(2)])
    assert (got - ref).abs().max().item() <= 1e-5


def test_text_states_are_wan_pipelines(models, pipes):
    prompts = ["  a large   red circle\n moves &amp; stays ", "x" * 700, "a"]  # cleaning; truncation at 512
    for flavour in ("t2v", "ti2v"):
        den, te = models[flavour].denoiser, models[flavour].text_encoder
        text, mask = te.encode(prompts)
        assert mask.sum(1).tolist()[1] == TEXT_LEN  # 700 letters: cut at 512 tokens, EOS last
        ref = _diffusers_text(pipes[flavour], prompts)
        assert (den.text_states(text, mask) - ref).abs().max().item() <= 1e-6
        null = den.text_states(text[:1], torch.zeros_like(mask[:1]))
        assert (null - _diffusers_text(pipes[flavour], [""])).abs().max().item() <= 1e-6


def test_time_grid_is_the_flow_match_euler_schedule(models):
    """diffusers' Euler sigmas: linspace(1, sigma_min, S) shifted, then 0, where sigma_min is the
    shifted 1/1000 (the shift is applied twice to it); UniPC's flow_shift gives the same grid."""
    s, S = 3.0, 6
    shift = lambda u: s * u / (1 + (s - 1) * u)  # noqa: E731
    expected = torch.cat([shift(torch.linspace(1.0, shift(torch.tensor(1e-3)), S, dtype=torch.float64)),
                          torch.zeros(1, dtype=torch.float64)]).float()
    grid = models["t2v"].time_grid(S)
    assert grid.shape == (S + 1,) and grid[0] == 1.0 and grid[-1] == 0.0
    assert torch.allclose(grid, expected, atol=1e-6)
    unipc = {"_class_name": "UniPCMultistepScheduler", "flow_shift": s, "use_flow_sigmas": True}
    assert torch.equal(flow_match_grid(S, unipc), grid)
    assert not torch.equal(flow_match_grid(S, unipc, shift=5.0), grid)


# ----------------------------------------------------------------------------------------
# (b) text-to-video equals WanPipeline
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["t2v", "ti2v"])
def test_text_to_video_equals_wan_pipeline(models, pipes, flavour):
    """Same weights, prompts, seeds (one generator per prompt on both sides, so each video's
    noise is its generator's first draw) and steps; FlowMatchEulerDiscreteScheduler(shift=3)."""
    H, W = SIZE[flavour]
    prompts = ["a red circle moves left", "a large blue square moves up across a gray background"]
    latents, video = sora_generate(models[flavour], prompts, H, W, 9, 4, 3.0, _gens(11, 12))

    seen = {}

    def keep_latents(pipe, i, t, kw):
        seen["latents"] = kw["latents"]
        return kw

    ref = pipes[flavour](prompts, height=H, width=W, num_frames=9, num_inference_steps=4, guidance_scale=3.0,
                         generator=_gens(11, 12), output_type="np", callback_on_step_end=keep_latents).frames
    assert latents.shape == seen["latents"].shape == (2, models[flavour].vae.latent_channels, 3, 4, 4)
    assert (latents - seen["latents"]).abs().max().item() <= 1e-4
    ours = ((video / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 4, 1).numpy()  # (B, T, H, W, 3) as WanPipeline's "np"
    assert ours.shape == ref.shape == (2, 9, H, W, 3)
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ours[0] - ours[1]).max() > 1e-2  # two different videos, not a constant


# ----------------------------------------------------------------------------------------
# (c) the training loss equals a direct computation
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour,cond", [("t2v", "none"), ("ti2v", "first")])
def test_training_loss_equals_direct_diffusers_computation(models, pipes, flavour, cond):
    """``flow_matching_loss`` through the protocol vs the loss written with the transformer: same
    timesteps, noise, clean frames and dropped prompts, drawn from one seed in the loss's order."""
    model, tr = models[flavour], pipes[flavour].transformer
    C, p, grid, N = model.vae.latent_channels, (1, 2, 2), (3, 2, 2), 12
    x0 = torch.randn(2, C, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    prompts = ["a red circle moves left", "a green triangle moves down"]
    text, mask = model.text_encoder.encode(prompts)
    samples = [Sample(tokens=patchify(x0[b], p), positions=position_ids(grid), grid=grid,
                      text=text[b][mask[b]], text_mask=torch.ones(int(mask[b].sum()), dtype=torch.bool))
               for b in range(2)]  # text as the trainer reads it: real tokens only
    flow = FlowConfig(shift=3.0, cond_mode_probs={cond: 1.0}, p_uncond=0.5)
    seed = 14
    model.denoiser.zero_grad(set_to_none=True)
    loss, stats = flow_matching_loss(model.denoiser, pack(samples), flow, torch.Generator().manual_seed(seed))
    loss.backward()  # gradients reach the diffusers weights through the wrapper
    assert model.denoiser.transformer.proj_out.weight.grad.abs().sum() > 0

    g = torch.Generator().manual_seed(seed)  # the same draws, in flow_matching_loss's order
    t = shift_timesteps(sample_logit_normal(2, 0.0, 1.0, g), torch.tensor([3.0, 3.0]))  # (B,)
    for _ in range(2):
        torch.multinomial(torch.tensor([1.0], dtype=torch.float64), 1, generator=g)  # one mode draw per video
    noise = torch.randn((2 * N, C * 4), generator=g)  # (B*N, D_in)
    kept = torch.rand(2, generator=g) >= 0.5
    assert kept.tolist() == [True, False], "seed 14 keeps one prompt and drops the other"
    eps = torch.stack([unpatchify(noise[b * N:(b + 1) * N], grid, p, C) for b in range(2)])  # (B, C, T, h, w)
    tt = t[:, None, None, None, None].expand_as(x0).clone()
    if cond == "first":
        tt[:, :, 0] = 0.0  # the first latent frame clean
    x_t = (1 - tt) * x0 + tt * eps
    timestep = t * 1000 if cond == "none" else tt[:, 0, :, ::2, ::2].reshape(2, N) * 1000
    states = _diffusers_text(pipes[flavour], [prompts[0], ""])  # the dropped prompt is Wan's empty one
    with torch.no_grad():
        pred = tr(hidden_states=x_t, timestep=timestep, encoder_hidden_states=states, return_dict=False)[0]
    err = (pred - (eps - x0)) ** 2  # (B, C, T, h, w)
    direct = err[:, :, 1:].mean() if cond == "first" else err.mean()
    assert abs(loss.item() - direct.item()) <= 1e-5 * max(1.0, direct.item())
    assert stats["loss_tokens"] == (16 if cond == "first" else 24) and stats["uncond_fraction"] == 0.5


# ----------------------------------------------------------------------------------------
# (d) TI2V: a clean first frame through sampling
# ----------------------------------------------------------------------------------------


def test_ti2v_image_to_video_keeps_the_first_frame_and_equals_diffusers(models, pipes):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    H, W = SIZE["ti2v"]
    image = still_image(H, W)
    prompt = ["a red square stays still"]
    latents, video = sora_generate(models["ti2v"], prompt, H, W, 9, 4, 3.0, _gens(7), image=image)
    pixels = torch.from_numpy(image).float().permute(2, 0, 1)[None, :, None] / 127.5 - 1.0
    first = models["ti2v"].vae.encode_latents(pixels)[0, :, 0]  # (C, h, w)
    assert torch.equal(latents[0, :, 0], first)  # held exactly through every step
    noise_first = torch.randn(latents[0].shape, generator=torch.Generator().manual_seed(7))[:, 0]
    assert (latents[0, :, 0] - noise_first).abs().max() > 0.5  # not a pass-through of the noise

    p = pipes["ti2v"]
    i2v = WanImageToVideoPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae,
                                  scheduler=p.scheduler, transformer=p.transformer, expand_timesteps=True)
    seen = {}

    def keep_latents(pipe, i, t, kw):
        seen["latents"] = kw["latents"]
        return kw

    # prompt states from WanPipeline: WanImageToVideoPipeline's own prompt cleaning calls ftfy
    # unconditionally in diffusers 0.42.1, and ftfy is not installed
    ref = i2v(image=Image.fromarray(image), prompt_embeds=_diffusers_text(p, prompt),
              negative_prompt_embeds=_diffusers_text(p, [""]), height=H, width=W, num_frames=9, num_inference_steps=4,
              guidance_scale=3.0, generator=_gens(7), output_type="np", callback_on_step_end=keep_latents).frames
    # diffusers lets the first frame drift in its state and pastes the image latents back at the end
    assert (latents[:, :, 1:] - seen["latents"][:, :, 1:]).abs().max().item() <= 1e-4
    ours = ((video / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 4, 1).numpy()
    assert np.abs(ours - ref).max() <= 1e-4

    with pytest.raises(ValueError, match="image-to-video"):
        sora_generate(models["t2v"], prompt, 32, 32, 9, 2, 3.0, _gens(7), image=still_image(32, 32))


# ----------------------------------------------------------------------------------------
# Bad directories: one clear error before any weights load
# ----------------------------------------------------------------------------------------


def test_directories_of_other_models_fail_clearly(wan_dirs, tmp_path):
    src = wan_dirs["t2v"]
    assert is_wan_dir(src) and not is_wan_dir(str(tmp_path))
    inspect_wan_dir(json_copy(src, str(tmp_path / "ok")))  # JSON alone passes the checks
    cases = [
        (("model_index.json", {"_class_name": "CogVideoXPipeline"}), "CogVideoXPipeline.*another architecture"),
        (("model_index.json", {"_class_name": "WanImageToVideoPipeline"}), "image-encoder conditioning"),
        (("model_index.json", {"transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}),
         "two-expert"),
        (("model_index.json", {"vae": ["diffusers", "AutoencoderKLCogVideoX"]}), "AutoencoderKLWan"),
        (("transformer/config.json", {"in_channels": 36, "image_dim": 1280}), "Wan I2V transformer"),
        (("vae/config.json", {"z_dim": 48}), "48 latent channels"),
        (("scheduler/scheduler_config.json", {"_class_name": "DDIMScheduler"}), "DDIMScheduler"),
    ]
    for i, (edit, message) in enumerate(cases):
        bad = json_copy(src, str(tmp_path / f"bad{i}"), edit)
        with pytest.raises(ValueError, match=message):
            load_wan(bad)
    sora_dir = tmp_path / "sora"
    sora_dir.mkdir()
    (sora_dir / "model_index.json").write_text(json.dumps({"format": "sora-ray/1", "dit": "dit"}))
    with pytest.raises(ValueError, match="SoraPipeline.from_pretrained"):
        load_wan(str(sora_dir))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_wan(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_wan(str(tmp_path / "missing"))
    partial = json_copy(src, str(tmp_path / "partial"))
    shutil.rmtree(os.path.join(partial, "text_encoder"))
    with pytest.raises(FileNotFoundError, match="text_encoder/ is missing"):
        load_wan(partial)


def test_without_text_encoder_the_unconditional_prompt_needs_null_text(wan_dirs, models):
    bare = load_wan(wan_dirs["t2v"], text_encoder=False)
    assert bare.text_encoder is None
    x, pos, ids = torch.randn(12, 64), position_ids((3, 2, 2)), torch.zeros(12, dtype=torch.long)
    text = torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match="empty text mask"):
        bare.denoiser(x, pos, torch.full((12,), 0.5), ids, text, torch.zeros(1, 5, dtype=torch.bool))
    null = models["t2v"].denoiser.null_text  # what an encode stage would store beside the latents
    given = load_wan(wan_dirs["t2v"], text_encoder=False, null_text=null[:1])
    with torch.no_grad():
        a = given.denoiser(x, pos, torch.full((12,), 0.5), ids, text, torch.zeros(1, 5, dtype=torch.bool))
        b = models["t2v"].denoiser(x, pos, torch.full((12,), 0.5), ids, text, torch.zeros(1, 5, dtype=torch.bool))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# LoRA: trained through the protocol, read by diffusers' load_lora_weights
# ----------------------------------------------------------------------------------------


def test_lora_adapter_round_trips_through_diffusers(wan_dirs, pipes, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    from sora.wan import WanDenoiser
    from sora.wan_lora import add_lora, load_lora, save_lora

    model = load_wan(wan_dirs["t2v"])  # its own copy: the adapter changes it
    params = add_lora(model.denoiser, rank=4, alpha=8)
    trainable = [n for n, p in model.denoiser.named_parameters() if p.requires_grad]
    assert len(params) == len(trainable) == 2 * 4 * 2 * 2 and all(".lora_" in n for n in trainable)
    grid, N = (3, 2, 2), 12
    x0 = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    text, mask = model.text_encoder.encode(["a red circle moves left", "a blue square"])
    batch = pack([Sample(tokens=patchify(x0[b], (1, 2, 2)), positions=position_ids(grid), grid=grid,
                         text=text[b][mask[b]], text_mask=torch.ones(int(mask[b].sum()), dtype=torch.bool))
                  for b in range(2)])
    loss, _ = flow_matching_loss(model.denoiser, batch, FlowConfig(shift=3.0), torch.Generator().manual_seed(0))
    loss.backward()  # only the adapter learns (B starts at 0, so A's gradient is 0 at the first step)
    assert all(p.grad is not None for n, p in model.denoiser.named_parameters() if ".lora_B" in n)
    assert all(p.grad is None for n, p in model.denoiser.named_parameters() if ".lora_" not in n)
    with torch.no_grad():  # an adapter that changes the output, as after training
        for n, p in model.denoiser.named_parameters():
            if ".lora_B" in n:
                p.normal_(0.0, 0.3)
    save_lora(model.denoiser, str(tmp_path / "adapter"))

    t = torch.full((2 * N,), 0.6)
    call = dict(positions=position_ids(grid).repeat(2, 1), timesteps=t, seq_ids=torch.arange(2).repeat_interleave(N),
                text=text, text_mask=mask)
    x = batch.tokens
    pipe = WanPipeline.from_pretrained(wan_dirs["t2v"], local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    states = _diffusers_text(pipe, ["a red circle moves left", "a blue square"])
    with torch.no_grad():
        ours = model.denoiser(x, **call)
        ref = pipe.transformer(hidden_states=x0, timestep=torch.full((2,), 600.0), encoder_hidden_states=states,
                               return_dict=False)[0]
        base = pipes["t2v"].transformer(hidden_states=x0, timestep=torch.full((2,), 600.0),
                                        encoder_hidden_states=states, return_dict=False)[0]
    got = torch.stack([unpatchify(ours[b * N:(b + 1) * N], grid, (1, 2, 2), 16) for b in range(2)])
    assert (got - ref).abs().max().item() <= 1e-5 and (ref - base).abs().max().item() > 1e-2

    other = load_wan(wan_dirs["t2v"], text_encoder=False, null_text=model.denoiser.null_text[:1])
    load_lora(other.denoiser, str(tmp_path / "adapter"), scale=0.5)
    pipe.set_adapters(pipe.get_active_adapters(), [0.5])
    with torch.no_grad():
        half = other.denoiser(x, **call)
        ref_half = pipe.transformer(hidden_states=x0, timestep=torch.full((2,), 600.0), encoder_hidden_states=states,
                                    return_dict=False)[0]
    got = torch.stack([unpatchify(half[b * N:(b + 1) * N], grid, (1, 2, 2), 16) for b in range(2)])
    assert (got - ref_half).abs().max().item() <= 1e-5

    narrow = WanDenoiser(WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                               out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2),
                         name="a narrower Wan")
    with pytest.raises(ValueError, match="another base model"):
        load_lora(narrow, str(tmp_path / "adapter"))
    assert not any(".lora_" in n for n, _ in narrow.named_parameters())  # refused before any change
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        load_lora(narrow, str(tmp_path))
    with pytest.raises(ValueError, match="match no linear layer"):
        add_lora(narrow, rank=4, targets=["to_nothing"])
