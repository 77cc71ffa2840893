"""train-vae on real Ray Train (2 DDP workers, gloo): it trains, checkpoints, and resumes."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from pipelines.train_vae import (VAETrainConfig, image_step, load_vae_checkpoint, make_vae_optimizer, random_batch,
                                 run_train_vae, split_clips)
from sora.vae import CausalVideoVAE, VAEConfig


def test_config_rejects_unknown_optimizers_and_bad_learning_rates():
    with pytest.raises(ValueError, match="optimizer"):
        VAETrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="learning rates"):
        VAETrainConfig(muon_lr=0.0)


def test_cli_with_a_bad_learning_rate_is_a_clear_error(tmp_path):
    from flows.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train-vae", "--data", str(tmp_path), "--out", str(tmp_path / "v"), "--muon-lr", "-1"])
    assert str(exc.value).startswith("sora train-vae: learning rates must be > 0"), str(exc.value)
    assert not (tmp_path / "v").exists()


def test_split_is_deterministic_and_disjoint():
    ids = [f"c{i}" for i in range(50)]
    train, held = split_clips(ids, 10)
    assert len(held) == 10 and not train & held and train | held == set(ids)
    assert split_clips(list(reversed(ids)), 10) == (train, held)


def test_every_rank_trains_on_images_or_on_windows_at_the_same_step():
    """Data-parallel ranks draw their crops from their own clips with their own generators, but
    a step is an image step or a video step on all of them (a rank with single frames beside one
    with 9-frame windows would idle at the all-reduce), and both kinds occur at about image_prob."""
    cfg = VAETrainConfig(data="unused", out="unused", image_prob=0.6, batch_size=2)
    ranks = []
    for rank in range(2):
        g = np.random.default_rng(rank)
        clips = [g.integers(0, 255, (12, 40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(3)]
        ranks.append((clips, np.random.default_rng(1000 + rank)))
    frames = [[random_batch(clips, cfg, rng, image=image_step(cfg, step)).shape[2] for clips, rng in ranks]
              for step in range(1, 401)]
    assert all(a == b for a, b in frames), "ranks trained on different kinds of batch at the same step"
    images = sum(a == 1 for a, _ in frames)
    assert {a for a, _ in frames} == {1, cfg.window_frames}
    assert 0.5 < images / len(frames) < 0.7
    # the choice is the seed's and the step's: the same on a resumed run
    assert [image_step(cfg, s) for s in range(1, 401)] == [a == 1 for a, _ in frames]


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
    assert summary["steps"] == 12 and summary["optimizer"] == "muon"  # Muon on the kernels by default
    # the last checkpoint holds both optimizers' states, sharded by the 2 workers; loading it in
    # one process works; resuming it with AdamW alone is refused
    ckpts = sorted(glob.glob(os.path.join(out, "_train", "vae", "checkpoint_*", "state.json")))
    assert ckpts, os.listdir(os.path.join(out, "_train", "vae"))
    last = os.path.dirname(max(ckpts, key=lambda f: json.load(open(f))["step"]))
    model = CausalVideoVAE(VAEConfig.preset("tiny"))
    muon_cfg = VAETrainConfig(**cfg)
    opt = make_vae_optimizer(model, muon_cfg)
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(os.listdir(last))
    assert load_vae_checkpoint(last, model, opt, muon_cfg)["step"] == 12
    trained = CausalVideoVAE.from_pretrained(out)  # the exported model is the checkpoint's weights
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), model.parameters()))
    assert len(opt) == 2 and opt[0].state  # Muon's momentum buffers came back (from the 2 workers' shards)
    adamw_cfg = VAETrainConfig(**cfg, optimizer="adamw")
    with pytest.raises(ValueError, match="optimizer='muon'"):
        load_vae_checkpoint(last, model, make_vae_optimizer(model, adamw_cfg), adamw_cfg)
    # and the same command with --optimizer adamw stops before starting any worker, nothing changed
    with pytest.raises(ValueError, match="optimizer='muon'"):
        run_train_vae(VAETrainConfig(**cfg, max_steps=16, optimizer="adamw"))
    assert json.load(open(os.path.join(out, "train_summary.json")))["steps"] == 12
    # the written VAE is a working model: encode/decode shapes line up
    x = torch.zeros(1, 3, 5, 32, 48)
    with torch.no_grad():
        assert CausalVideoVAE.from_pretrained(out).decode_latents(CausalVideoVAE.from_pretrained(out).encode_latents(x)).shape == x.shape
