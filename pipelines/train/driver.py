"""The training driver: check the model against the latents, run the workers, export the model."""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from typing import Any

from pipelines import storage, trainer
from pipelines.train.checkpoint import export_model
from pipelines.train.config import TrainConfig
from pipelines.train.data import inspect_latents, samples_mb
from pipelines.train.loop import LossFn, train_loop_per_worker
from pipelines.train.models import check_resumable, export_wan, plan_model

RUN_MODEL = "sora_model.json"  # in a run's directory: which model its checkpoints train (ModelPlan.identity)


def claim_run(run_dir: str, identity: dict[str, Any]) -> None:
    """A run directory remembers the model it trains: running it again with another model (a
    Wan directory, LoRA settings, or our DiT) fails here, before any worker starts, instead of
    when a worker loads the checkpoint."""
    marker = storage.join(run_dir, RUN_MODEL)
    if storage.exists(marker):
        check_resumable({"model": storage.read_json(marker)}, identity, run_dir)
    else:
        storage.write_json_atomic(identity, marker)


def read_latents_dataset(path: str, filesystem, cfg: TrainConfig):
    """The streaming Ray Data read of DATA/latents the workers train on, at most one read task
    per CPU of the cluster at once, or two per training worker where that is more (a cluster
    whose nodes are still being added when training starts). It must never wait for a CPU the
    training workers hold, also after a lost node, when Ray Train restarts the group on the
    nodes left. Two Ray Data (2.60) behaviours make it wait forever there:

    - Under Ray Train, Ray Data runs on what its AutoscalingCoordinator reserves for it: each
      node's CPUs left beside the workers, rounded DOWN to whole CPUs (the leftover is split
      with ``amount // requesters``). Once no node has a whole CPU free - two workers of 0.75
      CPU on a 2-CPU node, one on a 1-CPU node - Ray Data's CPU budget is 0. Read tasks that
      ask for no CPU (``read_cpus`` 0, the default) still start.
    - Its default Parquet reader (DataSourceV2) lists the files in a ``ListFiles`` task of one
      whole CPU, whatever ``num_cpus`` the read asks for, and that task never gets scheduled
      there. The first Parquet reader (``use_datasource_v2`` False) lists them on the driver,
      once, when the dataset is made.

    Read tasks that ask for no CPU are bounded by nothing but the read's ``concurrency``: without
    it Ray Data starts them all at once and Ray a worker process for each (the demo's 720-file
    latents on 2 CPUs: 45 worker processes started, 39 s and 88 CPU-s to read 53 MB, against
    4 processes, 4.5 s and 16 CPU-s at two tasks at once)."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    v2 = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False  # read by read_parquet when it builds the dataset
    try:
        return ray.data.read_parquet(path, filesystem=filesystem, file_extensions=["parquet"], num_cpus=cfg.read_cpus,
                                     concurrency=max(int(ray.cluster_resources().get("CPU", 0)), 2 * cfg.workers))
    finally:
        ctx.use_datasource_v2 = v2


def run_training(data: str, out: str, vae: str | None, cfg: TrainConfig, *, storage_path: str | None = None,
                 name: str | None = None, loss_fn: LossFn | None = None) -> dict[str, Any]:
    """Train on DATA/latents and write a complete model directory to ``out``: our DiT of
    ``cfg.preset`` with the VAE ``vae``, or a fine-tune of the Wan directory ``cfg.init`` (in
    full, or a LoRA adapter with ``cfg.lora_rank``; ``vae`` None: the directory's own).

    Everything about model and latents is checked before any Ray work (`models.plan_model`).
    Checkpoints go to ``storage_path/name`` (default: ``out/checkpoints``, name "dit", "wan" or
    "wan-lora"); running again with the same storage path and name continues from the latest
    checkpoint there, with any number of workers. ``loss_fn``: the loss of one pack (see
    `pipelines.train.loop.train_step`; default sora.flow.flow_matching_loss). Returns a summary
    (steps, final loss, the loss history, where things are, and ``metrics``: the last metrics
    the workers reported, e.g. ``tokens_per_s`` of the steps since the report before it)."""
    import ray

    from pipelines.ray_utils import ensure_ray

    info = inspect_latents(data)
    plan = plan_model(data, info, cfg, vae)
    cfg = plan.cfg
    if info["max_tokens"] > cfg.tokens_per_step:
        raise ValueError(f"the largest video has {info['max_tokens']} tokens, more than tokens_per_step="
                         f"{cfg.tokens_per_step}: raise the budget (--tokens-per-step)")
    if info["rows"] < cfg.workers:
        raise ValueError(f"{info['rows']} latents rows cannot feed {cfg.workers} workers: use fewer --workers")
    if plan.init is not None:
        print(f"[train] fine-tuning {plan.spec.name}"
              f"{' with a rank-' + str(plan.lora['rank']) + ' LoRA adapter' if plan.lora else ' (every weight)'}; "
              f"conditioning modes {cfg.cond_mode_probs}, timestep shift {cfg.base_shift:g}", flush=True)
    storage_path = storage_path or os.path.join(out, "checkpoints")
    claim_run(storage.join(storage_path, name or plan.kind), plan.identity())
    ensure_ray()
    data_fs, data_path = trainer.pyarrow_fs(storage.join(data, "latents"))
    ds = read_latents_dataset(data_path, data_fs, cfg)
    spare = ray.cluster_resources().get("CPU", 0.0) - cfg.workers * cfg.cpus_per_worker
    if not cfg.cache_data and cfg.read_cpus > 0 and spare < cfg.read_cpus:
        # The workers would hold every CPU while the streaming read still needs one: Ray Data
        # and Ray Train then wait on each other forever. Read everything up front instead.
        print(f"[train] only {spare:g} CPUs left beside the {cfg.workers} workers: caching the latents "
              f"in the object store before training (as --cache-data)", flush=True)
        cfg = replace(cfg, cache_data=True)
    if cfg.cache_data:
        ds = ds.materialize()
    keep_samples = cfg.cache_data or samples_mb(info) <= cfg.keep_samples_mb
    loop_config = ({"train": asdict(cfg), "model": plan.identity(), "keep_samples": keep_samples, **plan.loop_config()}
                   | ({"loss_fn": loss_fn} if loss_fn else {}))
    result = trainer.run_trainer(
        train_loop_per_worker, loop_config, workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker,
        use_gpu=cfg.use_gpu, storage_path=storage_path, name=name or plan.kind,
        max_failures=cfg.max_failures, keep_checkpoints=cfg.keep_checkpoints, datasets={"train": ds},
        placement=cfg.placement)
    assert result.checkpoint is not None, "training reported no checkpoint"
    checkpoint = trainer.checkpoint_url(result.checkpoint)
    if plan.init is None:
        summary = export_model(checkpoint, out, vae, info, cfg, data)
    else:
        summary = export_wan(checkpoint, out, plan, info, data)
    summary["checkpoint"] = checkpoint
    # rank 0's last report: the loss and throughput of the steps since the report before it
    summary["metrics"] = dict(result.metrics or {})
    return summary
