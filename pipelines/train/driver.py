"""The DiT training driver: size the model from the latents, run the workers, export the model."""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from typing import Any

from pipelines import storage, trainer
from pipelines.train.checkpoint import export_model
from pipelines.train.config import TrainConfig
from pipelines.train.data import inspect_latents
from pipelines.train.loop import LossFn, train_loop_per_worker
from sora.dit import DiTConfig


def run_training(data: str, out: str, vae: str, cfg: TrainConfig, *, storage_path: str | None = None,
                 name: str = "dit", loss_fn: LossFn | None = None) -> dict[str, Any]:
    """Train on DATA/latents and write a complete model directory to ``out``.

    Checkpoints go to ``storage_path/name`` (default: ``out/checkpoints/dit``); running again
    with the same storage path and name continues from the latest checkpoint there, with any
    number of workers. ``loss_fn``: the loss of one pack (see `pipelines.train.loop.train_step`;
    default sora.flow.flow_matching_loss). Returns a summary (steps, final loss, the loss
    history, where things are)."""
    import ray

    from pipelines.ray_utils import ensure_ray

    info = inspect_latents(data)
    dit_config = DiTConfig.preset(cfg.preset, in_channels=info["latent_channels"], patch_size=info["patch_size"],
                                  text_dim=info["text_dim"])
    if info["max_tokens"] > cfg.tokens_per_step:
        raise ValueError(f"the largest video has {info['max_tokens']} tokens, more than tokens_per_step="
                         f"{cfg.tokens_per_step}: raise the budget (--tokens-per-step)")
    if info["rows"] < cfg.workers:
        raise ValueError(f"{info['rows']} latents rows cannot feed {cfg.workers} workers: use fewer --workers")
    ensure_ray()
    data_fs, data_path = trainer.pyarrow_fs(storage.join(data, "latents"))
    ds = ray.data.read_parquet(data_path, filesystem=data_fs, file_extensions=["parquet"], num_cpus=cfg.read_cpus)
    spare = ray.cluster_resources().get("CPU", 0.0) - cfg.workers * cfg.cpus_per_worker
    if not cfg.cache_data and spare < cfg.read_cpus:
        # The workers would hold every CPU while the streaming read still needs one: Ray Data
        # and Ray Train then wait on each other forever. Read everything up front instead.
        print(f"[train] only {spare:g} CPUs left beside the {cfg.workers} workers: caching the latents "
              f"in the object store before training (as --cache-data)", flush=True)
        cfg = replace(cfg, cache_data=True)
    if cfg.cache_data:
        ds = ds.materialize()
    loop_config = {"train": asdict(cfg), "dit": asdict(dit_config)} | ({"loss_fn": loss_fn} if loss_fn else {})
    result = trainer.run_trainer(
        train_loop_per_worker, loop_config, workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker,
        use_gpu=cfg.use_gpu, storage_path=storage_path or os.path.join(out, "checkpoints"), name=name,
        max_failures=cfg.max_failures, keep_checkpoints=cfg.keep_checkpoints, datasets={"train": ds},
        placement=cfg.placement)
    assert result.checkpoint is not None, "training reported no checkpoint"
    checkpoint = trainer.checkpoint_url(result.checkpoint)
    summary = export_model(checkpoint, out, vae, info, cfg, data)
    summary["checkpoint"] = checkpoint
    return summary
