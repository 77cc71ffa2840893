"""Train the video compression network (causal 3D VAE) on Ray Train.

    DATA/clips -> each worker decodes its shard of clips at their native-aspect bucket sizes
    -> random windows (images = 1 frame, videos = 4k+1 frames) and random spatial crops
    -> DDP (gloo on CPU, NCCL on GPU) -> sharded checkpoints (`pipelines.trainer`) -> held-out
    PSNR -> OUT/ (config.json + model.safetensors, latent statistics fitted on the training clips)

Resume: re-running with the same output (same Ray Train storage path and name) continues from
the last checkpoint, with any number of workers; a worker that dies is replaced and training
continues from it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np


@dataclass
class VAETrainConfig:
    data: str = ""  # dataset directory or URL (from `sora ingest`)
    out: str = ""  # output VAE directory
    preset: str = "tiny"  # VAE size (sora.vae.VAEConfig.preset)
    workers: int = 2  # Ray Train workers (DDP)
    max_minutes: float = 10.0  # wall-clock budget of the training loop (decode time included)
    max_steps: int | None = None  # stop after this many steps (None: the time budget only)
    min_steps: int = 1  # steps trained even when the time budget is already used up (e.g. by decoding)
    lr: float = 1e-3  # AdamW learning rate (the cosine schedule's peak)
    # "muon": sora.optim.Muon on the hidden conv kernels, AdamW on biases and the first/last convs;
    # "adamw": AdamW on everything
    optimizer: Literal["muon", "adamw"] = "muon"
    muon_lr: float = 1.5e-3  # Muon's learning rate (AdamW-matched scale)
    min_lr_ratio: float = 0.05  # the cosine schedule ends at lr x this, over the time/step budget
    batch_size: int = 4  # crops per worker per step
    window_frames: int = 9  # frames per video crop (4k+1)
    crop: int = 32  # spatial crops of at most this many pixels per side (multiple of 8)
    # content-aware crops: draw this many candidate windows, keep the most varied one (1: plain random crops)
    crop_candidates: int = 4
    image_prob: float = 0.6  # fraction of steps that train on single images (1-frame videos)
    holdout: int = 100  # clips held out for the PSNR evaluation (never trained on)
    max_train_clips: int = 2000  # clips decoded per run (held in memory)
    kl_weight: float = 1e-6  # per-element KL weight (sora.vae_train.VAELossConfig)
    # latent normalisation fitted after training: "scalar" (one shift/scale) or "channel" (a mean/std per latent channel)
    latent_stats: Literal["scalar", "channel"] = "scalar"
    grad_weight: float = 0.5  # weight of the finite-difference (edge) loss
    fg_weight: float = 8.0  # extra weight of object pixels in the reconstruction loss (0: plain mean)
    checkpoint_every: int = 200  # a checkpoint every this many steps
    seed: int = 0  # model init and crop sampling
    use_gpu: bool = False  # one GPU per worker
    storage: str | None = None  # Ray Train storage path or URL for checkpoints (None: OUT/_train)
    name: str = "vae"  # run name under storage; the same name resumes

    def __post_init__(self) -> None:
        # checked here, not after training: a typo must not cost a whole training run
        if self.latent_stats not in ("channel", "scalar"):
            raise ValueError(f"latent_stats must be 'channel' or 'scalar', got {self.latent_stats!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if not (0.0 <= self.image_prob <= 1.0 and self.fg_weight >= 0):
            raise ValueError(f"need 0 <= image_prob <= 1 and fg_weight >= 0, got {self.image_prob}, {self.fg_weight}")
        if not (self.lr > 0 and self.muon_lr > 0):
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, muon_lr={self.muon_lr}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {self.min_steps}")
        if self.workers < 1 or self.max_minutes <= 0:
            raise ValueError(f"need workers >= 1 and max_minutes > 0, got {self.workers}, {self.max_minutes}")
        self.lr_schedule()

    def lr_schedule(self):
        from sora.optim import LRSchedule

        return LRSchedule(lr=self.lr, decay="cosine", min_lr_ratio=self.min_lr_ratio, max_steps=self.max_steps)


def split_clips(clip_ids: list[str], holdout: int) -> tuple[set[str], set[str]]:
    """Deterministic train / held-out split by a hash of the clip id (stable across runs)."""
    import hashlib

    ranked = sorted(clip_ids, key=lambda c: hashlib.sha1(f"holdout:{c}".encode()).hexdigest())
    held = set(ranked[: min(holdout, len(ranked) // 5)])  # never more than a fifth of the data
    return set(clip_ids) - held, held


def load_clip_frames(rows: list[dict], timeout: float = 60.0) -> list[np.ndarray]:
    """Decode each clip's content box at its bucket size: list of (T, H, W, 3) uint8 (failures skipped)."""
    from pipelines.clips import content_crop
    from sora.video_io import VideoError, read_frames

    out = []
    for r in rows:
        idx = list(range(int(r["start_frame"]), int(r["start_frame"]) + int(r["bucket_frames"])))
        try:
            out.append(read_frames(r["source"], idx, size=(int(r["bucket_width"]), int(r["bucket_height"])),
                                   crop=content_crop(r), timeout=timeout))
        except VideoError:
            continue
    return out


def image_step(cfg: VAETrainConfig, step: int) -> bool:
    """Whether 1-based ``step`` trains on single images (else on video windows): drawn from the
    seed and the step alone, so every data-parallel rank makes the same choice. A rank with an
    image batch beside one with a video window would wait for it at the gradient all-reduce."""
    return bool(np.random.default_rng([cfg.seed, step]).random() < cfg.image_prob)


def random_batch(clips: list[np.ndarray], cfg: VAETrainConfig, rng: np.random.Generator, image: bool | None = None):
    """A (B, 3, T, h, w) float batch in [-1, 1] of random windows and crops (one shape per batch):
    single frames (T = 1) where ``image`` (None: drawn from ``rng`` with ``cfg.image_prob``),
    else ``cfg.window_frames``-frame windows."""
    import torch

    if image is None:
        image = rng.random() < cfg.image_prob
    t = 1 if image else cfg.window_frames
    pool = [c for c in clips if c.shape[0] >= t]
    hs = min(min(c.shape[1] for c in pool), cfg.crop) // 8 * 8
    ws = min(min(c.shape[2] for c in pool), cfg.crop) // 8 * 8
    out = []
    for _ in range(cfg.batch_size):
        best, best_var = None, -1.0
        for _ in range(max(1, cfg.crop_candidates)):
            c = pool[rng.integers(len(pool))]
            t0 = rng.integers(c.shape[0] - t + 1)
            y0 = rng.integers(c.shape[1] - hs + 1)
            x0 = rng.integers(c.shape[2] - ws + 1)
            window = c[t0 : t0 + t, y0 : y0 + hs, x0 : x0 + ws]
            var = float(window.reshape(-1, 3).std(axis=0).sum())  # colour spread of the window
            if var > best_var:
                best, best_var = window, var
        out.append(best)
    x = torch.from_numpy(np.stack(out)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (B, 3, T, h, w)
    return x


def make_vae_optimizer(model, cfg: VAETrainConfig, data_parallel: bool = False):
    """AdamW alone, or Muon on the hidden conv kernels (`sora.vae_train.muon_kernel_names`) +
    AdamW on the rest, as one `sora.optim.Optimizers` (each group's ``lr_scale`` multiplies the
    schedule's lr). Muon's Newton-Schulz runs in float32 here. ``data_parallel``: the model is
    DDP-replicated, so Muon splits its Newton-Schulz work over the ranks (the same numbers)."""
    import torch

    from sora.optim import make_optimizers
    from sora.vae_train import muon_kernel_names

    muon = muon_kernel_names(model) if cfg.optimizer == "muon" else []
    return make_optimizers(model, lr=cfg.lr, muon=muon, muon_lr=cfg.muon_lr, ns_dtype=torch.float32,
                           across_ranks=data_parallel)


def load_vae_checkpoint(url: str, model, opt, cfg: VAETrainConfig) -> dict:
    """Load a training checkpoint (a directory or URL, written by any number of workers) into
    `model` and `opt` (from `make_vae_optimizer`) on every rank; returns its state.json. A
    checkpoint of the other optimizer is an error: its moments mean nothing to this one."""
    from pipelines import trainer

    saved = trainer.read_state(url).get("optimizer", "adamw")
    if saved != cfg.optimizer:
        raise ValueError(f"the checkpoint in {url} was trained with optimizer={saved!r}, not "
                         f"{cfg.optimizer!r}: resume with the same optimizer or train into a new output")
    return trainer.load_checkpoint(url, model, opt)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from pipelines import trainer
    from pipelines.clips import read_clips
    from sora.optim import lr_at
    from sora.vae import CausalVideoVAE, VAEConfig
    from sora.vae_train import VAELossConfig, vae_loss

    cfg = VAETrainConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # prepare_model puts the model there
    torch.manual_seed(cfg.seed + rank)
    rng = np.random.default_rng(cfg.seed * 1000 + rank)
    t_start = time.monotonic()

    clips = read_clips(cfg.data).to_pylist()
    train_ids, _ = split_clips([c["clip_id"] for c in clips], cfg.holdout)
    mine = [c for c in sorted(clips, key=lambda c: c["clip_id"]) if c["clip_id"] in train_ids][: cfg.max_train_clips]
    frames = load_clip_frames(mine[rank::world])
    assert frames, f"worker {rank}: no decodable training clips in {cfg.data}"

    model = CausalVideoVAE(VAEConfig.preset(cfg.preset))
    opt = make_vae_optimizer(model, cfg, data_parallel=world > 1)
    state = {"step": 0, "elapsed_minutes": 0.0, "resumed_from": None, "optimizer": cfg.optimizer,
             "config": asdict(model.config)}
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # every rank reads the shards it needs, whatever the number of workers that wrote them
        state = load_vae_checkpoint(trainer.checkpoint_url(ckpt), model, opt, cfg)
        state["resumed_from"] = state["step"]
    step, elapsed_before = state["step"], state["elapsed_minutes"]
    ddp = ray.train.torch.prepare_model(model)
    loss_cfg = VAELossConfig(kl_weight=cfg.kl_weight, grad_weight=cfg.grad_weight, fg_weight=cfg.fg_weight)
    schedule, budget = cfg.lr_schedule(), cfg.max_minutes
    t_loop = time.monotonic()
    history: list[float] = []

    def minutes_used() -> float:
        return elapsed_before + (time.monotonic() - t_start) / 60

    reports = trainer.MetricsReports(world, device)

    def report(metrics: dict, checkpoint: bool) -> None:  # every rank, the same steps
        state.update(step=step, elapsed_minutes=minutes_used())
        metrics = {"step": step, **metrics, "minutes": state["elapsed_minutes"]}
        if checkpoint:
            trainer.report(metrics, model=model, optimizers=opt, state=state)
            reports.reported()
        else:
            reports(metrics)  # at most every 10 s

    while True:
        out_of_time = minutes_used() >= budget and step >= cfg.min_steps
        done = out_of_time or (cfg.max_steps is not None and step >= cfg.max_steps)
        flag = torch.tensor(float(done), device=device)  # NCCL (GPUs) reduces device tensors only
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops on the same step
        if flag.item() > 0:
            break
        opt.set_lr(lr_at(step + 1, schedule, minutes_used() / budget))
        x = random_batch(frames, cfg, rng, image=image_step(cfg, step + 1)).to(device)
        model.train()
        opt.zero_grad(set_to_none=True)
        loss, metrics = vae_loss(ddp, x, loss_cfg)  # through DDP: gradients are all-reduced
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        history.append(metrics["loss"])
        if step % cfg.checkpoint_every == 0:
            report(metrics, checkpoint=True)
        elif step % 25 == 0:
            report(metrics, checkpoint=False)
            if rank == 0:
                print(f"[train-vae] step {step} loss {metrics['loss']:.4f} psnr {metrics['psnr']:.2f} dB "
                      f"({minutes_used():.1f}/{budget} min)", flush=True)
    # the final checkpoint and metrics
    report({"loss": history[-1] if history else float("nan"), "final": 1.0,
            "train_seconds": time.monotonic() - t_loop}, checkpoint=True)


# --------------------------------------------------------------------------- driver
def heldout_psnr(vae, data: str, holdout: int, max_clips: int | None = None) -> tuple[float, int]:
    """Mean PSNR (dB) of encode -> decode over the held-out clips at their bucket sizes."""
    import torch

    from pipelines.clips import read_clips
    from sora.vae_train import psnr

    clips = read_clips(data).to_pylist()
    _, held = split_clips([c["clip_id"] for c in clips], holdout)
    rows = sorted((c for c in clips if c["clip_id"] in held), key=lambda c: c["clip_id"])[:max_clips]
    scores = []
    vae.eval()
    with torch.no_grad():
        for frames in load_clip_frames(rows):
            x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
            x_hat = vae.decode(vae.encode(x, chunk_latent_frames=4).mode(), chunk_latent_frames=4)
            scores.append(float(psnr(x_hat, x)[0]))
    return (float(np.mean(scores)) if scores else float("nan")), len(scores)


def fit_stats(vae, data: str, holdout: int, n: int = 64, per_channel: bool = False) -> tuple[float, float]:
    """Latent normalisation from training clips (so diffusion sees ~unit-variance latents):
    per latent channel, or one scalar pair. Returns the scalar (shift, scale) either way."""
    import torch

    from pipelines.clips import read_clips

    clips = read_clips(data).to_pylist()
    train, _ = split_clips([c["clip_id"] for c in clips], holdout)
    rows = sorted((c for c in clips if c["clip_id"] in train), key=lambda c: c["clip_id"])[:n]
    zs = []
    with torch.no_grad():
        for frames in load_clip_frames(rows):
            x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
            z = vae.encode(x, chunk_latent_frames=4).mode()[0]  # (C, T', H', W'), sizes vary
            zs.append(z.reshape(z.shape[0], 1, 1, -1))  # (C, 1, 1, n_i)
    return vae.fit_latent_stats(torch.cat(zs, dim=-1), per_channel=per_channel)


def _check_resume_optimizer(run_dir: str, cfg: VAETrainConfig) -> None:
    """Before any worker starts: if this run already has checkpoints (local storage), they must
    come from the same optimizer. The workers check again (`load_vae_checkpoint`); this only
    turns four failed worker starts into one clear error."""
    import glob

    if "://" in run_dir:
        return
    for f in glob.glob(os.path.join(run_dir, "checkpoint_*", "state.json")):
        with open(f) as fh:
            saved = json.load(fh).get("optimizer", "adamw")  # checkpoints from before the option were AdamW
        if saved != cfg.optimizer:
            raise ValueError(f"{os.path.dirname(f)} was trained with optimizer={saved!r}, not {cfg.optimizer!r}: "
                             f"resume with the same optimizer or train into a new output")


def run_train_vae(cfg: VAETrainConfig) -> dict:
    """Train on Ray Train, then evaluate held-out PSNR and write OUT (a loadable VAE dir)."""
    from pipelines import storage, trainer
    from pipelines.clips import require_clips
    from sora.vae import CausalVideoVAE, VAEConfig

    storage_path = cfg.storage or os.path.join(os.path.abspath(cfg.out), "_train")
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    cfg.data = cfg.data if "://" in cfg.data else os.path.abspath(cfg.data)
    require_clips(cfg.data)  # before starting workers: a wrong path is a clear error, not a worker crash
    _check_resume_optimizer(os.path.join(storage_path, cfg.name), cfg)
    t0 = time.monotonic()
    result = trainer.run_trainer(train_loop_per_worker, asdict(cfg), workers=cfg.workers, use_gpu=cfg.use_gpu,
                                 storage_path=storage_path, name=cfg.name)
    train_seconds = time.monotonic() - t0
    assert result.checkpoint is not None, "training finished without a checkpoint"
    checkpoint = trainer.checkpoint_url(result.checkpoint)
    vae = CausalVideoVAE(VAEConfig.preset(cfg.preset))
    trainer.load_tensors(checkpoint, {"model": vae.state_dict()})  # consolidated here, in place
    state = trainer.read_state(checkpoint)
    score, n_held = heldout_psnr(vae, cfg.data, cfg.holdout)
    shift, scale = fit_stats(vae, cfg.data, cfg.holdout, per_channel=cfg.latent_stats == "channel")
    vae.save_pretrained(cfg.out)
    summary = {"steps": state["step"], "resumed_from_step": state.get("resumed_from"), "train_minutes": round(state["elapsed_minutes"], 2),
               "wall_seconds": round(train_seconds, 1), "heldout_psnr_db": round(score, 2), "heldout_clips": n_held,
               "shift_factor": shift, "scaling_factor": scale, "preset": cfg.preset, "workers": cfg.workers,
               "optimizer": cfg.optimizer, "lr": cfg.lr, "muon_lr": cfg.muon_lr if cfg.optimizer == "muon" else None,
               "checkpoint": checkpoint,
               "final_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}}
    storage.write_json_atomic(summary, os.path.join(os.path.abspath(cfg.out), "train_summary.json"))
    return summary
