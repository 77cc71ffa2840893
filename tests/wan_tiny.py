"""Tiny RANDOM Wan directories in diffusers' layout, and the sora-layer sampling loop the tests
compare with diffusers' own pipelines.

`build_tiny_wan` writes a `WanPipeline` (tokenizer, UMT5 text encoder, AutoencoderKLWan,
WanTransformer3DModel, FlowMatchEulerDiscreteScheduler) with `save_pretrained`, so tests load it
through the real `from_pretrained` paths. Nothing is downloaded: the tokenizer is a T5 Unigram
tokenizer whose vocabulary is written here. Two flavours:

- "t2v": Wan 2.1 T2V-style: 16-channel VAE (x4 time, x8 space; Wan 2.1's latent statistics),
  one timestep per video.
- "ti2v": Wan 2.2 TI2V-style: 48-channel residual VAE with a 2x2 pixel patch (x4 time, x16
  space), random latent statistics, `expand_timesteps` (per-token timesteps).
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import torch

# Shapes-world words, so test prompts tokenize to words rather than letters.
WORDS = ("a an the large small red green blue yellow cyan magenta white black gray navy circle square "
         "triangle moves from left to right up down across background stays still and").split()


def tiny_tokenizer():
    """A T5 (Unigram) tokenizer written on the fly: UMT5's special tokens (pad 0, eos 1, unk 2),
    the words above, and single letters so any ASCII prompt tokenizes."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    vocab += [("\u2581", -5.0)] + [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz.,'!?-0123456789"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


_BUILT: dict[tuple, str] = {}  # (flavour, seed, shift) -> directory: one build per test session


def build_tiny_wan(directory: str, flavour: str = "t2v", seed: int = 0, shift: float = 3.0) -> str:
    """Write a tiny random Wan directory (see the module docstring) and return it - or the one
    already built in this process with these arguments (it lives in an earlier test's temp dir
    for the whole session; tests never modify it)."""
    key = (flavour, seed, shift)
    if key in _BUILT and os.path.isdir(_BUILT[key]):
        return _BUILT[key]
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    assert flavour in ("t2v", "ti2v"), flavour
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    te_cfg = UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, dropout_rate=0.0)
    text_encoder = UMT5EncoderModel(copy.deepcopy(te_cfg)).eval()  # FOOTGUN: the model mutates its config
    if flavour == "t2v":
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])  # Wan 2.1's latents_mean/std
    else:
        g = torch.Generator().manual_seed(seed + 1)
        vae = AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                               dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                               scale_factor_spatial=16, scale_factor_temporal=4,
                               latents_mean=(torch.randn(48, generator=g) * 0.5).tolist(),
                               latents_std=(torch.rand(48, generator=g) * 1.5 + 0.5).tolist())
    channels = vae.config.z_dim
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=channels, out_channels=channels, text_dim=32, freq_dim=32,
                                        ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.eval(), scheduler=scheduler,
                       transformer=transformer.eval(), expand_timesteps=flavour == "ti2v")
    pipe.save_pretrained(directory)
    _BUILT[key] = directory
    return directory


def build_tiny_lora(directory: str, wan_dir: str, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> str:
    """Write a LoRA adapter of the Wan directory ``wan_dir`` with sora.wan_lora (rank 4, alpha 8 on
    the attention projections), its B matrices random as after training (a fresh adapter changes
    nothing), and return it - or the one already built in this process with these arguments."""
    key = ("lora", wan_dir, rank, alpha, seed)
    if key in _BUILT and os.path.isdir(_BUILT[key]):
        return _BUILT[key]
    from sora.wan import load_wan
    from sora.wan_lora import add_lora, save_lora

    model = load_wan(wan_dir, text_encoder=False)
    add_lora(model.denoiser, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if ".lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_lora(model.denoiser, directory)
    _BUILT[key] = directory
    return directory


def sora_generate(model, prompts: list[str], height: int, width: int, num_frames: int, steps: int,
                  guidance_scale: float, generators: list[torch.Generator], image: np.ndarray | None = None):
    """Text-to-video (or image-to-video with ``image`` (H, W, 3) uint8 as frame 0) written with the
    sora layer only, as ``SoraPipeline._sample`` does it: per-video initial noise from each
    generator, patch tokens packed with positions and video ids, ``sora.samplers.euler`` over the
    model's time grid with classifier-free guidance (``guided_velocity``: the unconditional branch
    is the all-False text mask, in the same forward), known tokens held clean at t = 0.

    Returns (latents (B, C, T, h, w), video (B, 3, num_frames, H, W) float in [-1, 1])."""
    from sora.denoiser import spec_of
    from sora.patches import patchify, position_ids, unpatchify
    from sora.samplers import euler, guided_velocity, initial_noise

    spec = spec_of(model.denoiser)
    spec.check_generation_mode("text-to-video" if image is None else "image-to-video")
    B, vae = len(prompts), model.vae
    C, sc = vae.latent_channels, vae.spatial_compression
    T = (num_frames - 1) // vae.temporal_compression + 1
    shape = (C, T, height // sc, width // sc)
    grid = (T, shape[2] // spec.patch_size[1], shape[3] // spec.patch_size[2])
    N = grid[0] * grid[1] * grid[2]

    noise = torch.stack([initial_noise(shape, g) for g in generators])  # (B, C, T, h, w)
    known = torch.zeros_like(noise)
    known_frames = torch.zeros(B, T, dtype=torch.bool)
    if image is not None:
        pixels = torch.from_numpy(image).float().permute(2, 0, 1)[None, :, None] / 127.5 - 1.0  # (1, 3, 1, H, W)
        known[:, :, :1] = vae.encode_latents(pixels)  # (1, C, 1, h, w), broadcast over the batch
        known_frames[:, 0] = True

    tok = lambda v: torch.cat([patchify(v[b], spec.patch_size) for b in range(B)])  # noqa: E731  (B*N, D_in)
    known_mask = known_frames.repeat_interleave(grid[1] * grid[2], dim=1).reshape(-1)  # (B*N,)
    positions = position_ids(grid).repeat(B, 1)  # (B*N, 3)
    seq_ids = torch.arange(B).repeat_interleave(N)  # (B*N,)
    text, mask = model.text_encoder.encode(prompts)  # (B, L, D), (B, L)
    velocity = guided_velocity(model.denoiser, positions, seq_ids, text, mask, guidance_scale)
    x = euler(velocity, tok(noise), model.time_grid(steps), tok(known), known_mask)  # (B*N, D_in)
    latents = torch.stack([unpatchify(x[b * N:(b + 1) * N], grid, spec.patch_size, C) for b in range(B)])
    return latents, vae.decode_latents(latents)


def still_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: a coloured square on a textured background."""
    rng = np.random.default_rng(seed)
    img = (rng.random((height, width, 3)) * 80 + 40).astype(np.uint8)
    img[height // 4: height // 2, width // 4: width // 2] = (230, 40, 40)
    return img


def json_copy(src: str, dst: str, edit=None) -> str:
    """Copy only the JSON files of a Wan directory (no weights: loading any would fail loudly);
    `edit` = (relative path, {key: value}) updates one of them."""
    for root, _, files in os.walk(src):
        for f in files:
            if f.endswith(".json"):
                out = os.path.join(dst, os.path.relpath(root, src))
                os.makedirs(out, exist_ok=True)
                shutil.copy(os.path.join(root, f), out)
    if edit:
        rel, changes = edit
        path = os.path.join(dst, rel)
        with open(path) as fh:
            data = json.load(fh)
        data.update(changes)
        with open(path, "w") as fh:
            json.dump(data, fh)
    return dst
