"""A tiny RANDOM model directory for generation tests: a small causal VAE, a one-block DiT whose
input width matches the VAE's latent channels, and a reference to the offline MiniLM encoder,
written through `SoraPipeline.save_pretrained` so tests load it through the real path."""

from __future__ import annotations

import os

import numpy as np
import torch

from sora.model_dir import default_index

# Small defaults so every test generation takes a fraction of a second on a busy CPU.
DEFAULTS = {"fps": 8, "width": 32, "height": 32, "num_frames": 9, "num_inference_steps": 2, "guidance_scale": 2.0}


_BUILT: dict[int, str] = {}  # seed -> directory: one build per test session (tests never modify it)


def build_tiny_model(directory: str, seed: int = 0) -> str:
    """Write the tiny model to ``directory`` (or return the one already built in this process
    with this seed - it lives in an earlier test's temp dir for the whole session)."""
    if seed in _BUILT and os.path.isdir(_BUILT[seed]):
        return _BUILT[seed]
    from sora.dit import DiT, DiTConfig
    from sora.pipeline import SoraPipeline
    from sora.text_encoder import TextEncoder
    from sora.vae import CausalVideoVAE, VAEConfig

    torch.manual_seed(seed)
    vae = CausalVideoVAE(VAEConfig(latent_channels=4, base_channels=8, channel_multipliers=(1, 2, 2),
                                   num_res_blocks=1, patch_size=2, norm_groups=4)).eval()
    text_encoder = TextEncoder.from_pretrained(None, max_length=32)
    dit = DiT(DiTConfig(in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=text_encoder.dim)).eval()
    # adaLN-Zero makes an untrained DiT output exactly 0 (then every prompt gives the same
    # video); random weights everywhere make the output depend on prompt, time and position.
    with torch.no_grad():
        for p in dit.parameters():
            if p.abs().max() == 0:
                p.normal_(0.0, 0.1)
    index = default_index()
    index["defaults"] = dict(DEFAULTS)
    index["training"] = {"note": "random weights, for tests"}
    SoraPipeline(vae, dit, text_encoder, index).save_pretrained(directory)
    _BUILT[seed] = directory
    return directory


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 arrays of one shape."""
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def moving_square(width: int, height: int, frames: int, color=(255, 0, 0), seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8: a square crossing a textured background left to right."""
    rng = np.random.default_rng(seed)
    base = (rng.random((height, width, 3)) * 60 + 40).astype(np.uint8)
    out = np.repeat(base[None], frames, axis=0)
    side = max(2, min(width, height) // 3)
    for t in range(frames):
        x = int(t / max(1, frames - 1) * (width - side))
        y = (height - side) // 2
        out[t, y:y + side, x:x + side] = color
    return out
