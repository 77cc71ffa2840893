"""Training on Ray Train: our DiT (packed native-aspect batches), or a fine-tune of a diffusers
Wan directory (same-shape batches, every weight or a LoRA adapter); rectified flow, resumable.

    sora train --data data/ds --vae models/vae --out models/tiny --preset tiny --workers 2 --max-minutes 20
    sora train --data data/wan --init Wan2.1-T2V-1.3B-Diffusers --lora-rank 8 --out models/wan-lora

What happens (torchtitan-style: config dataclass, one ``parallelize``, state through
``torch.distributed.checkpoint.state_dict``):

1. The driver (`driver.run_training`) reads the small columns of ``DATA/latents`` with pyarrow
   to size the DiT (latent channels, patch size, text width) or check them against the Wan
   directory (`models.plan_model`: its VAE, text encoder, channels, conditioning modes) and
   the token budget, then hands ``ray.data.read_parquet(DATA/latents)`` to a ``TorchTrainer``
   as ``datasets={"train": ds}``. Ray Train streams it and splits it across the workers.
2. Each worker (`loop.train_loop_per_worker`) turns rows into :class:`~sora.packing.Sample` s
   (`data`), groups them by a token budget - packs of any shapes for the DiT, same-shape
   batches for a model that runs one forward per shape - and takes one optimizer step (AdamW,
   or Muon + AdamW for the DiT: ``sora.optim``) on :func:`~sora.flow.flow_matching_loss` per pack.
   Workers step in lockstep: a small all-reduce per step says whether every worker still has a
   pack, and carries the loss, token and FLOP counts for the metrics.
3. Every ``checkpoint_every_steps`` steps or ``checkpoint_every_minutes`` minutes each worker
   writes its shards of the model, EMA and optimizer state (only what trains: a LoRA run's
   checkpoints hold the adapter) (`checkpoint`, the format of
   ``pipelines.trainer``) to the run's storage (local path or ``s3://``). A worker that dies
   is replaced and the group resumes from the last checkpoint (``FailureConfig``); running the
   same command again resumes too, with any number of workers.
4. The driver turns the final checkpoint into a complete model directory
   (``sora.model_dir``): ``dit/`` (EMA weights), ``vae/``, and the text encoder reference; for
   a Wan run, the adapter or the fine-tuned transformer beside references to the base
   directory (`models.export_wan`).

Layers: this package imports ray; the model (``sora.dit``) knows nothing about parallelism.
"""

from pipelines.train.checkpoint import EMA, export_model, load_checkpoint, load_ema, save_checkpoint
from pipelines.train.config import TrainConfig
from pipelines.train.data import batch_by_grid, inspect_latents, iter_cached_packs, iter_packs, sample_from_row
from sora.dit import pack_flops
from pipelines.train.driver import run_training
from pipelines.train.loop import (build_model, make_optimizer, muon_parameter_names, parallelize, train_loop_per_worker,
                                  train_step)
from pipelines.train.models import ModelPlan, export_wan, plan_model

__all__ = ["EMA", "ModelPlan", "TrainConfig", "batch_by_grid", "build_model", "export_model", "export_wan",
           "inspect_latents", "iter_cached_packs", "iter_packs", "load_checkpoint", "load_ema", "make_optimizer",
           "muon_parameter_names", "pack_flops", "parallelize", "plan_model", "run_training", "sample_from_row",
           "save_checkpoint", "train_loop_per_worker", "train_step"]
