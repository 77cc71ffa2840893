"""Train the video compression network (causal 3D VAE) on Ray Train.

    DATA/clips -> each worker decodes its shard of clips at their native-aspect bucket sizes
    -> random windows (images = 1 frame, videos = 4k+1 frames) and random spatial crops
    -> DDP (gloo on CPU, NCCL on GPU) -> checkpoints -> held-out PSNR -> OUT/ (config.json +
    model.safetensors, latent statistics fitted on the training clips)

Resume: re-running with the same output (same Ray Train storage path and name) continues from
the last checkpoint; a worker that dies is replaced and training continues from it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class VAETrainConfig:
    data: str = ""
    out: str = ""
    preset: str = "tiny"
    workers: int = 2
    max_minutes: float = 10.0  # wall-clock budget of the training loop (decode time included)
    max_steps: int | None = None
    lr: float = 1e-3  # AdamW; 2e-3 diverged on the shapes world (sora/vae_train.py has the figures)
    # "muon": sora.vae_train.KernelMuon on the hidden conv kernels (AdamW on biases and the
    # first/last convs); "adamw": AdamW on everything. Muon ends ~3.7 dB higher in equal time.
    optimizer: str = "muon"
    muon_lr: float = 1.5e-3  # KernelMuon's lr (AdamW-matched scale): 1e-3 and 2e-3 alike, 3e-3 unstable, 5e-3 diverged
    min_lr_ratio: float = 0.05  # cosine decay to lr * this over the time/step budget
    batch_size: int = 4  # crops per worker per step
    window_frames: int = 9  # 4k+1 frames per video crop
    # spatial crops of at most this many pixels per side (multiple of 8): 32 beat 64 and 16 on
    # held-out PSNR in equal time (more, cheaper steps; sora/vae_train.py has the figures)
    crop: int = 32
    # content-aware crops: draw this many candidate windows, keep the most varied one (flat
    # background windows teach nothing once the colours are right); 1 = plain random crops
    crop_candidates: int = 4
    # fraction of steps that train on single images (1-frame videos). Image steps cost ~1/5 of
    # a 9-frame step and teach the same spatial detail: 0.6 beat 0.25 on the shape ceiling
    # (docs/experiments.md, VAE)
    image_prob: float = 0.6
    holdout: int = 100  # clips held out for the PSNR evaluation (never trained on)
    max_train_clips: int = 2000  # clips decoded per run (in memory) - enough for the shapes world
    kl_weight: float = 1e-6
    # latent normalisation fitted after training: "scalar" (one shift/scale) or "channel" (a
    # mean/std per latent channel; see VAEConfig.latents_std). The shortcut's detail channels
    # spread ~4x less than its colour channels, so "channel" should help shape; measured on the
    # shapes world (tiny DiT, 64 clips, 800 steps, captions regenerated and scored) it did not
    # clearly (shape 0.35 vs 0.31, motion 0.27 vs 0.21, within noise) and cost colour (0.79 vs
    # 0.90), so "scalar" stays the default.
    latent_stats: str = "scalar"
    grad_weight: float = 0.5
    fg_weight: float = 8.0  # extra weight of object pixels in the reconstruction loss (VAELossConfig)
    checkpoint_every: int = 200  # steps
    seed: int = 0
    use_gpu: bool = False
    storage: str | None = None  # Ray Train storage path (default OUT/_train); local or s3://
    name: str = "vae"

    def __post_init__(self) -> None:
        # checked here, not after training: a typo must not cost a whole training run
        assert self.latent_stats in ("channel", "scalar"), (
            f"latent_stats must be 'channel' or 'scalar', got {self.latent_stats!r}")
        assert self.optimizer in ("adamw", "muon"), f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}"
        assert 0.0 <= self.image_prob <= 1.0 and self.fg_weight >= 0, (
            f"need 0 <= image_prob <= 1 and fg_weight >= 0, got {self.image_prob}, {self.fg_weight}")
        assert self.lr > 0 and self.muon_lr > 0, f"learning rates must be > 0, got lr={self.lr}, muon_lr={self.muon_lr}"


def split_clips(clip_ids: list[str], holdout: int) -> tuple[set[str], set[str]]:
    """Deterministic train / held-out split by a hash of the clip id (stable across runs)."""
    import hashlib

    ranked = sorted(clip_ids, key=lambda c: hashlib.sha1(f"holdout:{c}".encode()).hexdigest())
    held = set(ranked[: min(holdout, len(ranked) // 5)])  # never more than a fifth of the data
    return set(clip_ids) - held, held


def load_clip_frames(rows: list[dict], timeout: float = 60.0) -> list[np.ndarray]:
    """Decode each clip at its bucket size: list of (T, H, W, 3) uint8 (failures skipped)."""
    from sora.video_io import VideoError, read_frames

    out = []
    for r in rows:
        idx = list(range(int(r["start_frame"]), int(r["start_frame"]) + int(r["bucket_frames"])))
        try:
            out.append(read_frames(r["source"], idx, size=(int(r["bucket_width"]), int(r["bucket_height"])), timeout=timeout))
        except VideoError:
            continue
    return out


def random_batch(clips: list[np.ndarray], cfg: VAETrainConfig, rng: np.random.Generator):
    """A (B, 3, T, h, w) float batch in [-1, 1] of random windows and crops (one shape per batch)."""
    import torch

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


def _cosine_lr(cfg: VAETrainConfig, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    # a plain float: numpy scalars in the optimizer state would not load with weights_only=True
    return float(cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + np.cos(np.pi * progress))))


def make_vae_optimizer(model, cfg: VAETrainConfig, data_parallel: bool = False):
    """AdamW alone, or KernelMuon on the hidden conv kernels + AdamW on the rest, as one
    `pipelines.train.Optimizers` (each group's ``lr_scale`` multiplies the schedule's lr).
    ``data_parallel``: the model is DDP-replicated, so KernelMuon splits its Newton-Schulz work
    over the ranks (same numbers, each rank does its share)."""
    import torch

    from pipelines.train import Optimizers
    from sora.vae_train import KernelMuon, muon_kernel_names

    muon = set(muon_kernel_names(model)) if cfg.optimizer == "muon" else set()
    rest = [p for n, p in model.named_parameters() if n not in muon]
    opts = Optimizers([torch.optim.AdamW([{"params": rest, "lr_scale": 1.0}], lr=cfg.lr, weight_decay=0.0)])
    if muon:
        opts.insert(0, KernelMuon([{"params": [p for n, p in model.named_parameters() if n in muon],
                                    "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr, across_ranks=data_parallel))
    return opts


def load_vae_checkpoint(directory: str, model, opt, cfg: VAETrainConfig) -> dict:
    """Load a training checkpoint (model, optimizer states) into `model` and `opt` (from
    `make_vae_optimizer`); returns its state.json. A checkpoint of the other optimizer is an
    error: its moments mean nothing to this one."""
    import torch
    from safetensors.torch import load_file

    with open(os.path.join(directory, "state.json")) as f:
        state = json.load(f)
    saved = state.get("optimizer", "adamw")  # checkpoints from before the option were AdamW
    if saved != cfg.optimizer:
        raise ValueError(f"the checkpoint in {directory} was trained with optimizer={saved!r}, not "
                         f"{cfg.optimizer!r}: resume with the same optimizer or train into a new output")
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    opt_states = torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True)
    for o, sd in zip(opt, opt_states if isinstance(opt_states, list) else [opt_states], strict=True):
        o.load_state_dict(sd)
    return state


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from pipelines.ingest import read_clips
    from sora.vae import CausalVideoVAE, VAEConfig
    from sora.vae_train import VAELossConfig, vae_loss

    cfg = VAETrainConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
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
    step, elapsed_before, resumed_from = 0, 0.0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = load_vae_checkpoint(d, model, opt, cfg)
            step, elapsed_before = state["step"], state["elapsed_minutes"]
            resumed_from = step
    ddp = ray.train.torch.prepare_model(model)
    loss_cfg = VAELossConfig(kl_weight=cfg.kl_weight, grad_weight=cfg.grad_weight, fg_weight=cfg.fg_weight)
    budget = cfg.max_minutes
    t_loop = time.monotonic()
    history: list[float] = []

    def minutes_used() -> float:
        return elapsed_before + (time.monotonic() - t_start) / 60

    while True:
        done = minutes_used() >= budget or (cfg.max_steps is not None and step >= cfg.max_steps)
        flag = torch.tensor(float(done))
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops on the same step
        if flag.item() > 0:
            break
        progress = max(minutes_used() / budget, step / cfg.max_steps if cfg.max_steps else 0.0)
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(cfg, progress) * g["lr_scale"]
        x = random_batch(frames, cfg, rng)
        model.train()
        opt.zero_grad(set_to_none=True)
        loss, metrics = vae_loss(ddp, x, loss_cfg)  # through DDP: gradients are all-reduced
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        history.append(metrics["loss"])
        if step % cfg.checkpoint_every == 0:
            _report(step, metrics, model, opt, minutes_used(), rank, save_file, resumed_from, cfg.optimizer)
        elif step % 25 == 0:
            ray.train.report({"step": step, **metrics, "minutes": minutes_used()})
            if rank == 0:
                print(f"[train-vae] step {step} loss {metrics['loss']:.4f} psnr {metrics['psnr']:.2f} dB "
                      f"({minutes_used():.1f}/{budget} min)", flush=True)
    # final checkpoint + metrics (rank 0 writes the model; everyone reports)
    _report(step, {"loss": history[-1] if history else float("nan"), "final": 1.0,
                   "train_seconds": time.monotonic() - t_loop}, model, opt, minutes_used(), rank, save_file, resumed_from,
            cfg.optimizer)


def _report(step, metrics, model, opt, minutes, rank, save_file, resumed_from=None, optimizer="adamw") -> None:
    import ray.train
    import torch
    from ray.train import Checkpoint

    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                      os.path.join(d, "model.safetensors"))
            torch.save([o.state_dict() for o in opt], os.path.join(d, "optimizer.pt"))  # tensors + plain types
            json.dump({"step": step, "elapsed_minutes": minutes, "resumed_from": resumed_from, "optimizer": optimizer,
                       "config": asdict(model.config)},
                      open(os.path.join(d, "state.json"), "w"))
            ray.train.report({"step": step, **metrics, "minutes": minutes}, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report({"step": step, **metrics, "minutes": minutes})


# --------------------------------------------------------------------------- driver
def heldout_psnr(vae, data: str, holdout: int, max_clips: int | None = None) -> tuple[float, int]:
    """Mean PSNR (dB) of encode -> decode over the held-out clips at their bucket sizes."""
    import torch

    from pipelines.ingest import read_clips
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

    from pipelines.ingest import read_clips

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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from pipelines import storage
    from pipelines.ingest import require_clips
    from sora.vae import CausalVideoVAE, VAEConfig

    storage_path = cfg.storage or os.path.join(os.path.abspath(cfg.out), "_train")
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    cfg.data = cfg.data if "://" in cfg.data else os.path.abspath(cfg.data)
    require_clips(cfg.data)  # before starting workers: a wrong path is a clear error, not a worker crash
    _check_resume_optimizer(os.path.join(storage_path, cfg.name), cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=3),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.monotonic()
    result = trainer.fit()
    train_seconds = time.monotonic() - t0
    assert result.checkpoint is not None, "training finished without a checkpoint"
    vae = CausalVideoVAE(VAEConfig.preset(cfg.preset))
    with result.checkpoint.as_directory() as d:
        vae.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
        state = json.load(open(os.path.join(d, "state.json")))
    score, n_held = heldout_psnr(vae, cfg.data, cfg.holdout)
    shift, scale = fit_stats(vae, cfg.data, cfg.holdout, per_channel=cfg.latent_stats == "channel")
    vae.save_pretrained(cfg.out)
    summary = {"steps": state["step"], "resumed_from_step": state.get("resumed_from"), "train_minutes": round(state["elapsed_minutes"], 2),
               "wall_seconds": round(train_seconds, 1), "heldout_psnr_db": round(score, 2), "heldout_clips": n_held,
               "shift_factor": shift, "scaling_factor": scale, "preset": cfg.preset, "workers": cfg.workers,
               "optimizer": cfg.optimizer, "lr": cfg.lr, "muon_lr": cfg.muon_lr if cfg.optimizer == "muon" else None,
               "final_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}}
    storage.write_json_atomic(summary, os.path.join(os.path.abspath(cfg.out), "train_summary.json"))
    return summary
