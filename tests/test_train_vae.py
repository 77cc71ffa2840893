"""train-vae on real Ray Train (2 DDP workers, gloo): it trains, checkpoints, and resumes."""

from __future__ import annotations

import json
import os

import torch

from pipelines.train_vae import VAETrainConfig, run_train_vae, split_clips
from sora.vae import CausalVideoVAE


def test_split_is_deterministic_and_disjoint():
    ids = [f"c{i}" for i in range(50)]
    train, held = split_clips(ids, 10)
    assert len(held) == 10 and not train & held and train | held == set(ids)
    assert split_clips(list(reversed(ids)), 10) == (train, held)


def test_train_vae_two_workers_checkpoints_and_resumes(shapes_ds, tmp_path, ray_session):
    out = str(tmp_path / "vae")
    cfg = dict(data=shapes_ds, out=out, workers=2, max_minutes=5.0, batch_size=2, window_frames=5, crop=32,
               holdout=4, checkpoint_every=4)
    first = run_train_vae(VAETrainConfig(**cfg, max_steps=8))
    assert first["steps"] == 8 and first["resumed_from_step"] is None
    assert first["heldout_clips"] == 4 and 0 < first["heldout_psnr_db"] < 60
    vae = CausalVideoVAE.from_pretrained(out)
    assert vae.config.scaling_factor == first["scaling_factor"] != 1.0  # latent stats fitted and saved
    assert vae.config.latents_std is None  # scalar by default (latent_stats="channel" fits per channel)
    # the same command with a larger budget continues from step 8, not from zero
    second = run_train_vae(VAETrainConfig(**cfg, max_steps=12))
    assert second["resumed_from_step"] == 8 and second["steps"] == 12
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    assert summary["steps"] == 12
    # the written VAE is a working model: encode/decode shapes line up
    x = torch.zeros(1, 3, 5, 32, 48)
    with torch.no_grad():
        assert CausalVideoVAE.from_pretrained(out).decode_latents(CausalVideoVAE.from_pretrained(out).encode_latents(x)).shape == x.shape
