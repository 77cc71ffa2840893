"""Training the DiT on Ray Train: packed native-aspect batches, rectified flow, resumable.

    sora train --data data/ds --vae models/vae --out models/tiny --preset tiny --workers 2 --max-minutes 20

What happens (torchtitan-style: config dataclass, one ``parallelize``, state through
``state_dict``/``load_state_dict``):

1. The driver reads the small columns of ``DATA/latents`` with pyarrow to size the DiT
   (latent channels, patch size, text width) and check the token budget, then hands
   ``ray.data.read_parquet(DATA/latents)`` to a ``TorchTrainer`` as ``datasets={"train": ds}``.
   Ray Train streams it and splits it across the workers (``get_dataset_shard``).
2. Each worker turns rows into :class:`~sora.packing.Sample` s (``tensors_from_row`` +
   ``position_ids``), groups them by a token budget (``batch_by_token_budget``), packs them
   and takes one optimizer step (AdamW, or Muon + AdamW: ``make_optimizer``) on
   :func:`~sora.flow.flow_matching_loss` per pack. Workers step
   in lockstep: a small all-reduce per step says whether every worker still has a pack, and
   carries the loss, token and FLOP counts for the metrics.
3. Every ``checkpoint_every_steps`` steps or ``checkpoint_every_minutes`` minutes the workers
   gather the full model, EMA and optimizer state and rank 0 reports a checkpoint
   (model.safetensors, ema.safetensors, optimizer.pt, state.json) to the run's storage
   (local path or ``s3://``). A worker that dies is replaced and the group resumes from the
   last checkpoint (``FailureConfig``); running the same command again resumes too.
4. The driver turns the final checkpoint into a complete model directory
   (``sora.model_dir``): ``dit/`` (EMA weights), ``vae/``, and the text encoder reference.

Layers: this module imports ray; the model (``sora.dit``) knows nothing about parallelism.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from pipelines import storage
from pipelines.latents import read_latents, tensors_from_row
from sora.dit import DiT, DiTConfig, flops_per_token
from sora.flow import FlowConfig, flow_matching_loss
from sora.packing import Sample, batch_by_token_budget, pack
from sora.patches import position_ids

# Text encoder names the encode stage writes for the offline default (path None in the index).
DEFAULT_TEXT_ENCODERS = ("minilm", "", None)

# The loss curve kept in state.json (every step; the oldest are dropped past this many).
HISTORY_STEPS = 100_000

# Peak dense bf16 FLOP/s per device, for the MFU estimate when `peak_flops` is not given.
# (H100/H200 SXM: 989 TFLOP/s dense; A100: 312.) Matched on the CUDA device name.
KNOWN_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data, the VAE and where to write.

    Steps are *iterations*: a step whose loss is not finite consumes its data and counts as
    a step, but makes no optimizer update (``optimizer updates = step - nonfinite``).
    """

    preset: str = "tiny"  # DiT size (sora.dit.PRESETS); channels/patch/text width come from the data
    workers: int = 2  # Ray Train workers (one process, one GPU each when use_gpu)
    cpus_per_worker: float = 1.0  # torch threads per worker = max(1, int(this)) on CPU
    use_gpu: bool = False
    max_steps: int | None = 2000  # stop after this global step (None: only max_minutes)
    max_minutes: float | None = None  # stop after this much wall time of this run
    # Token budget of one pack per worker per step (NaViT): sized to the GPU memory, not to a
    # sample count. Must hold the largest video of the dataset.
    tokens_per_step: int = 4096
    max_samples_per_pack: int | None = None  # cap videos per pack (None: budget only)
    lr: float = 1e-4  # peak AdamW learning rate (DiT/PixArt use 1e-4 at batch 256)
    # "adamw", or "muon": torch.optim.Muon (orthogonalised momentum) for the 2-D weight
    # matrices inside the DiT blocks, AdamW for everything else (embeddings, the final layer,
    # biases, norms). Muon's step is scaled to AdamW's update size ("match_rms_adamw"), so the
    # same ``lr`` fits both; ``muon_lr`` overrides it for the Muon part. Needs whole matrices:
    # with several GPUs use ``fsdp=False`` (DDP). See docs/experiments.md for what it bought here.
    optimizer: str = "adamw"
    muon_lr: float | None = None
    muon_momentum: float = 0.95
    warmup_steps: int = 100  # linear warmup from 0 to lr
    # after warmup: "constant"; "cosine" (to min_lr_ratio * lr at max_steps); or "cooldown":
    # constant, then linear to min_lr_ratio * lr over the last cooldown_fraction of the run,
    # the run's progress being max(step / max_steps, elapsed / max_minutes), so a time-budgeted
    # run cools down in its last minutes (a resumed run gets a fresh max_minutes, as it does
    # for stopping, so its progress by time restarts)
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    cooldown_fraction: float = 0.2
    weight_decay: float = 0.0  # applied to matrices only, never to norms/biases/embeddings of size D
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping, still measured)
    # EMA of the weights (what the output model holds). The effective decay ramps as
    # min(decay, (1 + n) / (10 + n)) over n updates so short runs still get a usable EMA.
    ema_decay: float = 0.9999
    checkpoint_every_steps: int = 500
    checkpoint_every_minutes: float | None = 15.0
    keep_checkpoints: int = 2  # older checkpoints are deleted from storage
    max_failures: int = 3  # worker-group restarts from the last checkpoint before giving up
    log_every_steps: int = 10  # ray.train.report + one progress line from rank 0
    # Flow matching (sora.flow.FlowConfig): timestep shift grows with tokens per video.
    p_uncond: float = 0.1  # prompt dropped (classifier-free guidance)
    # salient tokens' loss weight (sora.flow.FlowConfig.fg_weight); 1: all alike. Above 1 the
    # logged loss is the weighted mean, not comparable with a run at 1.
    fg_weight: float = 1.0
    cond_mode_probs: dict[str, float] = field(
        default_factory=lambda: {"none": 0.7, "first": 0.15, "first_k": 0.05, "last_k": 0.05, "first_last": 0.05}
    )
    base_shift: float = 1.0
    base_tokens: int | None = 256  # None: a fixed shift of base_shift for every size
    seed: int = 0
    shuffle_buffer_rows: int = 256  # local shuffle buffer of each worker's stream (0: off)
    read_cpus: float = 0.25  # CPUs per Ray Data read task (parquet decode is light)
    # Read DATA/latents once into Ray's object store before training (only for data that fits
    # in memory): later epochs then skip the Parquet reads, which dominate on small datasets.
    # Each worker also keeps the samples of its first epoch and reshuffles them locally after
    # that, so an epoch no longer starts a Ray Data execution (~1 s each, every ~10 steps on
    # the shapes world).
    cache_data: bool = False
    # GPU only (ignored on CPU): see `parallelize` for the order they are applied in.
    bf16: bool = True  # autocast to bfloat16 (FSDP: bf16 params in compute, fp32 reduce)
    fsdp: bool = True  # FSDP2 (fully_shard per block, then the root) instead of DDP
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each block
    peak_flops: float | None = None  # per worker, for MFU; None: KNOWN_PEAK_FLOPS by GPU name
    # Test hook: steps whose loss is replaced by NaN on rank 0 (exercises the skip path).
    debug_nonfinite_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.debug_nonfinite_steps = tuple(self.debug_nonfinite_steps)
        assert self.max_steps is not None or self.max_minutes is not None, "set max_steps or max_minutes"
        assert self.schedule in ("constant", "cosine", "cooldown"), (
            f"schedule must be constant, cosine or cooldown, got {self.schedule!r}")
        assert self.schedule != "cosine" or self.max_steps, "the cosine schedule needs max_steps"
        assert 0 < self.cooldown_fraction <= 1, f"cooldown_fraction must be in (0, 1], got {self.cooldown_fraction}"
        assert 0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
        assert self.tokens_per_step > 0 and self.workers >= 1
        assert self.optimizer in ("adamw", "muon"), f"optimizer must be adamw or muon, got {self.optimizer!r}"
        assert self.fg_weight >= 1.0, f"fg_weight must be >= 1 (1: every token alike), got {self.fg_weight}"
        assert self.lr > 0 and (self.muon_lr is None or self.muon_lr > 0), (
            f"learning rates must be > 0, got lr={self.lr}, muon_lr={self.muon_lr}")
        if self.optimizer == "muon" and self.use_gpu and self.fsdp and self.workers > 1:
            raise ValueError("optimizer='muon' needs whole weight matrices, but FSDP shards them: "
                             "set fsdp=False (DDP) or use optimizer='adamw'")

    def flow(self) -> FlowConfig:
        return FlowConfig(shift=self.base_shift, base_tokens=self.base_tokens,
                          cond_mode_probs=dict(self.cond_mode_probs), p_uncond=self.p_uncond,
                          fg_weight=self.fg_weight)


def lr_at(step: int, cfg: TrainConfig, time_progress: float = 0.0) -> float:
    """Learning rate of 1-based ``step``: linear warmup, then constant, cosine decay or a
    final linear cooldown. ``time_progress``: the elapsed fraction of ``max_minutes`` (the
    same on every worker; only "cooldown" reads it). Stateless (a function of the step and
    the clock), so resuming needs no scheduler state."""
    if cfg.warmup_steps > 0 and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cooldown":
        progress = max(step / cfg.max_steps if cfg.max_steps else 0.0, time_progress)
        left = min(1.0, max(0.0, (1.0 - progress) / cfg.cooldown_fraction))  # 1 until the cooldown starts
        return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * left)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Optimizers(list):
    """One or more torch optimizers stepped together (AdamW alone, or Muon + AdamW).

    A list, so ``torch.distributed.checkpoint.state_dict`` saves and loads all of them as one
    state dict; ``param_groups`` spans them all. Each group's ``lr_scale`` multiplies the
    schedule's learning rate (``lr_at``)."""

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self for g in opt.param_groups]

    def step(self) -> None:
        for opt in self:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self:
            opt.zero_grad(set_to_none=set_to_none)


def muon_parameter_names(model: DiT) -> list[str]:
    """The weights Muon updates: every 2-D matrix inside the transformer blocks (attention,
    cross-attention, MLP, adaLN modulation). Embeddings in and out stay with AdamW."""
    return [n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]


class RankSplitMuon(torch.optim.Muon):
    """torch.optim.Muon for a DDP-replicated model: the same update, bit for bit, but each
    matrix's Newton-Schulz iteration runs on one rank (``orthogonalize_across_ranks``) instead
    of on all of them. On the demo's 2 CPU workers Muon was ~30 ms of a ~300 ms step. Same
    state (``momentum_buffer``), so checkpoints are interchangeable with plain Muon's."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        from sora.vae_train import orthogonalize_across_ranks

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:  # as torch's _single_tensor_muon, up to the orthogonalisation
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                updates.append(p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
            ortho = lambda u: _zeropower_via_newtonschulz(u, group["ns_coefficients"], group["ns_steps"], group["eps"])  # noqa: E731
            lr = float(group["lr"])
            for p, o in zip(params, orthogonalize_across_ranks(updates, ortho)):
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(o, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def make_optimizer(model: DiT, cfg: TrainConfig, sharded: bool = False, data_parallel: bool = False) -> Optimizers:
    """The optimizer(s) of ``cfg.optimizer`` over ``model``'s parameters (after parallelize).
    Weight decay goes to matrices only. ``sharded``: the parameters are FSDP shards, which
    Muon cannot orthogonalise (it needs whole matrices). ``data_parallel``: the model is
    replicated (DDP), so Muon splits its work over the ranks (`RankSplitMuon`)."""
    named = list(model.named_parameters())
    decays = {n: p.dim() >= 2 and "null_text" not in n for n, p in named}
    muon = set(muon_parameter_names(model)) if cfg.optimizer == "muon" else set()
    if muon and sharded:
        raise ValueError("optimizer='muon' needs whole weight matrices, but FSDP shards them: "
                         "train with fsdp=False (DDP) or optimizer='adamw'")
    rest = [(n, p) for n, p in named if n not in muon]
    groups = [{"params": [p for n, p in rest if decays[n]], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": [p for n, p in rest if not decays[n]], "weight_decay": 0.0, "lr_scale": 1.0}]
    opts = Optimizers([torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)])
    if muon:
        scale = (cfg.muon_lr / cfg.lr) if cfg.muon_lr else 1.0
        opts.insert(0, (RankSplitMuon if data_parallel else torch.optim.Muon)(
            [{"params": [p for n, p in named if n in muon], "weight_decay": cfg.weight_decay, "lr_scale": scale}],
            lr=cfg.lr * scale, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
            adjust_lr_fn="match_rms_adamw"))
    return opts


# ----------------------------------------------------------------------------------------
# Data: latents rows -> samples -> packs
# ----------------------------------------------------------------------------------------


def sample_from_row(row: dict[str, Any]) -> Sample:
    """One latents row -> a Sample: tokens (N, D_in) float32, positions (N, 3) from the grid,
    text states (L, D_text) float32 with an all-True mask (only real tokens are stored)."""
    t = tensors_from_row(row)
    tokens = torch.from_numpy(t["tokens"].astype(np.float32, copy=False))  # (N, D_in)
    text = torch.from_numpy(t["text"].astype(np.float32, copy=False))  # (L, D_text)
    return Sample(tokens=tokens, positions=position_ids(t["grid"]), grid=t["grid"], text=text,
                  text_mask=torch.ones(text.shape[0], dtype=torch.bool),
                  metadata={"clip_id": t["clip_id"]})


def iter_packs(shard, cfg: TrainConfig, epoch: int, rank: int, skip_rows: int = 0) -> Iterator[list[Sample]]:
    """One epoch of this worker's shard as packs (lists of Samples within the token budget).

    ``skip_rows`` rows are read and dropped first: the resume point inside an epoch. Ray
    Data's streaming split does not promise the same rows to the same worker on a re-run, so
    this resumes the *amount* of data seen in the epoch, not the exact rows."""
    shuffle = cfg.shuffle_buffer_rows or None
    batches = shard.iter_batches(batch_size=16, batch_format="pyarrow", local_shuffle_buffer_size=shuffle,
                                 local_shuffle_seed=(cfg.seed * 1000003 + epoch * 1009 + rank) if shuffle else None)

    def samples() -> Iterator[Sample]:
        skip = skip_rows
        for table in batches:
            for row in table.to_pylist():
                if skip > 0:
                    skip -= 1
                    continue
                yield sample_from_row(row)

    yield from batch_by_token_budget(samples(), cfg.tokens_per_step, max_samples=cfg.max_samples_per_pack)


def iter_cached_packs(cached: list[Sample], cfg: TrainConfig, epoch: int, rank: int, skip_rows: int = 0
                      ) -> Iterator[list[Sample]]:
    """Like `iter_packs`, from this worker's samples kept in memory: a seeded shuffle per
    (seed, epoch, rank), then the first ``skip_rows`` dropped (resume inside an epoch)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
    order = torch.randperm(len(cached), generator=g).tolist()[skip_rows:]
    yield from batch_by_token_budget((cached[i] for i in order), cfg.tokens_per_step,
                                     max_samples=cfg.max_samples_per_pack)


def _collecting(packs: Iterator[list[Sample]], into: list[Sample]) -> Iterator[list[Sample]]:
    """Pass packs through, remembering every sample in `into`."""
    for p in packs:
        into.extend(p)
        yield p


def pack_flops(samples: list[Sample], config: DiTConfig) -> float:
    """Training FLOPs of one pack: each video's tokens cost flops_per_token at its own length."""
    return sum(s.num_tokens * flops_per_token(config, s.num_tokens, int(s.text_mask.sum())) for s in samples)


# ----------------------------------------------------------------------------------------
# Parallelism: applied to a plain DiT in one place, in a fixed order
# ----------------------------------------------------------------------------------------


def parallelize(model: DiT, cfg: TrainConfig, device: torch.device, world_size: int) -> nn.Module:
    """Wrap a DiT for data-parallel training; the model itself stays parallelism-free.

    Order (torchtitan): activation checkpointing, then torch.compile per block, then FSDP2
    (``fully_shard`` each block, then the root, so each block's parameters are gathered just
    before it runs and freed after). Without FSDP: DDP (gloo on CPU, NCCL on GPU; Ray Train
    has set up the process group). AC/compile/FSDP/bf16 are GPU features here: on CPU the
    result is plain DDP in float32.
    Returns the module to call; parameters keep their names (in-place compile, FSDP2).
    """
    on_gpu = device.type == "cuda"
    model.to(device)
    if on_gpu and cfg.activation_checkpointing:
        model.gradient_checkpointing = True  # the DiT's own per-block torch.utils.checkpoint
    if on_gpu and cfg.compile:
        for block in model.blocks:
            block.compile()  # in place: state_dict keys unchanged
    if on_gpu and cfg.fsdp and world_size > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.bf16 else None, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)  # timesteps stay float32 (see DiT.forward)
        for i, block in enumerate(model.blocks):
            # the last block is not resharded after forward: backward needs it right away
            fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.blocks) - 1)
        fully_shard(model, mp_policy=mp)
        return model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a parameter-like tensor (gathers an FSDP2 DTensor: a collective)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().contiguous()


class EMA:
    """Exponential moving average of the parameters, held like the parameters themselves
    (sharded DTensors under FSDP2, so it costs 1/world of the model per worker).

    The decay warms up as min(decay, (1 + u) / (10 + u)) after u updates, so early weights do
    not linger: a decay d only takes effect after ~9 / (1 - d) updates (0.995: ~1,800; 0.998:
    ~4,500; 0.9999: ~90,000). Until then the average spans about the last u / 9 steps."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - d)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: _full(v) for k, v in self.shadow.items()}  # every rank must call (FSDP gathers)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        assert set(state) == set(self.shadow), f"EMA keys differ: {sorted(set(state) ^ set(self.shadow))[:5]}"
        for k, v in self.shadow.items():
            full = state[k].to(v.device if not isinstance(v, DTensor) else v.device_mesh.device_type)
            v.copy_(distribute_tensor(full, v.device_mesh, v.placements) if isinstance(v, DTensor) else full)
        self.updates = updates


# ----------------------------------------------------------------------------------------
# Checkpoints: model.safetensors, ema.safetensors, optimizer.pt, state.json (no pickle)
# ----------------------------------------------------------------------------------------


def save_checkpoint(directory: str | None, model: nn.Module, optimizer, ema: EMA, state: dict) -> None:
    """Gather full (unsharded) states on every rank; rank 0 (``directory`` not None) writes.
    The optimizer state is tensors, numbers and strings only: ``torch.save`` it, and read it
    back with ``torch.load(weights_only=True)``, which refuses arbitrary pickles."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # only rank 0 receives the tensors
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    ema_sd = ema.full_state_dict()
    if directory is None:
        return
    save_file({k: v.contiguous() for k, v in model_sd.items()}, os.path.join(directory, "model.safetensors"))
    save_file(ema_sd, os.path.join(directory, "ema.safetensors"))
    torch.save(optim_sd, os.path.join(directory, "optimizer.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(state, f, indent=1)


def load_checkpoint(directory: str, model: nn.Module, optimizer, ema: EMA) -> dict:
    """Inverse of :func:`save_checkpoint`, on every rank (each reads the full files)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    with open(os.path.join(directory, "state.json")) as f:
        state = json.load(f)
    saved = state.get("optimizer", "adamw")  # checkpoints from before the option were AdamW
    if any(isinstance(opt, torch.optim.Muon) for opt in optimizer) != (saved == "muon"):
        raise ValueError(f"the checkpoint in {directory} was trained with optimizer={saved!r}; resume it with "
                         f"the same optimizer (or start a new run name)")
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_file(os.path.join(directory, "model.safetensors")), options=opts)
    optim_sd = torch.load(os.path.join(directory, "optimizer.pt"), map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
    ema.load_full_state_dict(load_file(os.path.join(directory, "ema.safetensors")), state["ema_updates"])
    return state


# ----------------------------------------------------------------------------------------
# The per-worker loop
# ----------------------------------------------------------------------------------------


def _all_reduce(values: list[float], device: torch.device, world_size: int) -> list[float]:
    """Sum a few floats over the workers (float64, one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in KNOWN_PEAK_FLOPS.items() if k in name), None)
    return None  # CPU: no meaningful peak; tflops_per_worker is still reported


@dataclass
class Window:
    """Sums over the steps since the last report (global over workers)."""

    tokens: float = 0.0  # real tokens
    slots: float = 0.0  # token budget offered (tokens_per_step per worker per step)
    flops: float = 0.0
    loss: float = 0.0  # sum of finite step losses
    finite_steps: int = 0
    start: float = field(default_factory=time.monotonic)

    def metrics(self, world: int, peak: float | None) -> dict[str, Any]:
        dt = max(time.monotonic() - self.start, 1e-9)
        return {"loss_window": self.loss / max(self.finite_steps, 1), "tokens_per_s": self.tokens / dt,
                "padding_fraction": 1.0 - self.tokens / max(self.slots, 1.0),
                "tflops_per_worker": self.flops / dt / world / 1e12,
                "mfu": (self.flops / dt / world / peak) if peak else None}


def train_step(model: nn.Module, samples: list[Sample], step: int, optimizer, cfg: TrainConfig, flow: FlowConfig,
               dit_config: DiTConfig, device: torch.device, rank: int, world: int, autocast,
               time_progress: float = 0.0) -> dict[str, float]:
    """One synchronous step on one pack per worker. Returns global figures: loss (NaN when
    skipped), grad_norm, real tokens, flops, rows, skipped (1.0 when the loss or the gradient
    was not finite on any worker: then no optimizer update happens anywhere), lr (the
    schedule's, before each group's lr_scale)."""
    batch = pack(samples).to(device)
    lr = lr_at(step, cfg, time_progress)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 4099 + rank)  # stateless per step
    with autocast:
        loss, stats = flow_matching_loss(model, batch, flow, generator)
    if rank == 0 and step in cfg.debug_nonfinite_steps:
        loss = loss * float("nan")
    loss_sum, loss_n, real, flops, rows, bad = _all_reduce(
        [loss.item() * stats["loss_tokens"], stats["loss_tokens"], batch.num_tokens, pack_flops(samples, dit_config),
         len(samples), not math.isfinite(loss.item())], device, world)
    loss.backward()  # always, on every rank: DDP/FSDP collectives must match across ranks
    norm = float(_full(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))))
    skipped = bool(bad) or not math.isfinite(norm)  # norm is global: grads are already reduced
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float("nan") if skipped else loss_sum / max(loss_n, 1.0), "grad_norm": norm, "tokens": real,
            "flops": flops, "rows": rows, "skipped": float(skipped), "lr": lr}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config = {"train": asdict(TrainConfig), "dit": asdict(DiTConfig)}``."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config["train"])
    dit_config = DiTConfig(**config["dit"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP/FSDP also sync it)
    core = DiT(dit_config)
    model = parallelize(core, cfg, device, world)  # the optimizer must see the (sharded) params after this
    sharded = device.type == "cuda" and cfg.fsdp and world > 1
    optimizer = make_optimizer(core, cfg, sharded=sharded, data_parallel=world > 1 and not sharded)
    ema = EMA(core, cfg.ema_decay)
    flow = cfg.flow()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)
    peak = _peak_flops(cfg, device)

    state = {"step": 0, "epoch": 0, "epoch_rows": 0, "samples_seen": 0, "tokens_seen": 0, "nonfinite": 0,
             "ema_updates": 0, "seed": cfg.seed, "resumed_from": [], "history": [], "dit_config": config["dit"], "optimizer": cfg.optimizer}
    checkpoint = ray.train.get_checkpoint()  # set on a restart after a failure and on a re-run
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, model, optimizer, ema)
        state["resumed_from"].append(state["step"])
    if rank == 0:
        print(f"[train] rank 0 of {world} on {device}: {core.num_params() / 1e6:.2f}M params, "
              f"{'resuming at step ' + str(state['step']) if checkpoint else 'from scratch'}", flush=True)

    shard = ray.train.get_dataset_shard("train")
    t_start = t_ckpt = time.monotonic()
    window, metrics = Window(), {}
    last_ckpt_step, reported_checkpoint = state["step"], False
    done = cfg.max_steps is not None and state["step"] >= cfg.max_steps

    def report(with_checkpoint: bool) -> None:  # every rank, at the same steps (a barrier)
        nonlocal t_ckpt, last_ckpt_step, reported_checkpoint
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d if rank == 0 else None, model, optimizer, ema, state)
            ckpt = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
            ray.train.report({**metrics, "checkpoint_step": state["step"]}, checkpoint=ckpt)
        t_ckpt, last_ckpt_step, reported_checkpoint = time.monotonic(), state["step"], True

    cached: list[Sample] | None = None  # this worker's samples, once a whole epoch was read (cache_data)
    while not done:
        skip = state["epoch_rows"] // world
        collected: list[Sample] | None = [] if cached is None and cfg.cache_data and skip == 0 else None
        if cached is not None:
            packs = iter_cached_packs(cached, cfg, state["epoch"], rank, skip_rows=skip)
        elif collected is not None:  # a whole epoch from the shard: keep it
            packs = _collecting(iter_packs(shard, cfg, state["epoch"], rank), collected)
        else:
            packs = iter_packs(shard, cfg, state["epoch"], rank, skip_rows=skip)
        steps_this_epoch = 0
        while not done:
            samples = next(packs, None)
            now = time.monotonic()
            # One collective decides for everyone (clocks and shards differ between workers):
            # [workers with a pack, time is up, time to checkpoint, elapsed fraction of max_minutes
            # (the schedule's clock)], the last three by rank 0's clock
            have, out_of_time, ckpt_due, time_progress = _all_reduce([
                samples is not None,
                rank == 0 and cfg.max_minutes is not None and now - t_start >= 60 * cfg.max_minutes,
                rank == 0 and cfg.checkpoint_every_minutes is not None and now - t_ckpt >= 60 * cfg.checkpoint_every_minutes,
                (now - t_start) / (60 * cfg.max_minutes) if rank == 0 and cfg.max_minutes else 0.0,
            ], device, world)
            if have < world:
                break  # a worker's shard is exhausted: the epoch ends for all (lockstep DDP)
            step = state["step"] + 1
            out = train_step(model, samples, step, optimizer, cfg, flow, dit_config, device, rank, world, autocast,
                             time_progress)
            if out["skipped"]:
                state["nonfinite"] += 1  # no update, no EMA; its data still counts as seen
            else:
                ema.update(core)
                window.loss += out["loss"]
                window.finite_steps += 1
            window.tokens += out["tokens"]
            window.slots += cfg.tokens_per_step * world
            window.flops += out["flops"]
            state.update(step=step, lr=out["lr"], samples_seen=state["samples_seen"] + int(out["rows"]),
                         epoch_rows=state["epoch_rows"] + int(out["rows"]),
                         tokens_seen=state["tokens_seen"] + int(out["tokens"]), ema_updates=ema.updates)
            state["history"].append([step, out["loss"]])
            del state["history"][:-HISTORY_STEPS]
            steps_this_epoch += 1
            done = bool(out_of_time) or (cfg.max_steps is not None and step >= cfg.max_steps)
            log_now = step % cfg.log_every_steps == 0 or done
            ckpt_now = bool(ckpt_due) or step % cfg.checkpoint_every_steps == 0 or done
            if log_now or ckpt_now:
                metrics = {"step": step, "epoch": state["epoch"], "loss": out["loss"], "lr": state["lr"],
                           "grad_norm": out["grad_norm"], "nonfinite": state["nonfinite"],
                           "samples_seen": state["samples_seen"], **window.metrics(world, peak)}
                if rank == 0 and log_now:
                    muon = f" (muon {optimizer[0].param_groups[0]['lr']:.2e})" if cfg.optimizer == "muon" else ""
                    mfu = f" | mfu {100 * metrics['mfu']:.1f}%" if peak else ""
                    print(f"[train] step {step}{'/' + str(cfg.max_steps) if cfg.max_steps else ''} | epoch "
                          f"{state['epoch']} | loss {metrics['loss_window']:.4f} | {metrics['tokens_per_s']:.0f} tok/s"
                          f" | pad {100 * metrics['padding_fraction']:.1f}% | grad {out['grad_norm']:.3f} | lr "
                          f"{metrics['lr']:.2e}{muon}{mfu} | nonfinite {state['nonfinite']}", flush=True)
                report(with_checkpoint=ckpt_now)
                window = Window()
        if not done:
            assert steps_this_epoch > 0 or state["epoch_rows"] > 0, (
                "an epoch produced no step: some worker got no data (fewer latents rows than workers?)")
            if collected is not None:
                for _ in packs:  # read what the lockstep stop left unread (_collecting keeps it)
                    pass
                cached = collected
            state["epoch"] += 1
            state["epoch_rows"] = 0
    if state["step"] != last_ckpt_step or not reported_checkpoint:
        # the final state is always this run's latest checkpoint (also when a re-run had
        # nothing left to do), so the driver exports exactly what training ended with
        report(with_checkpoint=True)


# ----------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------


def inspect_latents(data: str) -> dict[str, Any]:
    """What the model must match, from the small columns of DATA/latents (plain pyarrow)."""
    cols = ["latent_channels", "patch_t", "patch_h", "patch_w", "grid_t", "grid_h", "grid_w", "text_shape",
            "text_encoder", "vae", "fps", "width", "height", "num_frames"]
    table = read_latents(data, columns=cols).to_pydict()
    n = len(table["grid_t"])
    if n == 0:
        raise FileNotFoundError(f"{storage.join(data, 'latents')} holds no rows: run `sora encode` first")
    def one(key: str):
        values = set(map(str, table[key]))
        assert len(values) == 1, f"latents mix several {key} values {sorted(values)[:4]}: train on one at a time"
        return table[key][0]
    tokens = [t * h * w for t, h, w in zip(table["grid_t"], table["grid_h"], table["grid_w"])]
    def mode(key: str):
        values, counts = np.unique(np.asarray(table[key]), return_counts=True)
        return values[counts.argmax()].item()
    return {
        "rows": n, "max_tokens": max(tokens), "mean_tokens": float(np.mean(tokens)),
        "latent_channels": int(one("latent_channels")),
        "patch_size": (int(one("patch_t")), int(one("patch_h")), int(one("patch_w"))),
        "text_dim": int(table["text_shape"][0][1]), "text_encoder": one("text_encoder"), "vae": one("vae"),
        "fps": mode("fps"), "width": int(mode("width")), "height": int(mode("height")),
        "num_frames": int(mode("num_frames")),
    }


def _pyarrow_fs(url: str):
    """(pyarrow filesystem, path) for any fsspec URL, so Ray Train/Data use the same
    credentials and endpoints as the rest of the project (e.g. s3 on a custom endpoint)."""
    import pyarrow.fs as pafs

    fs, path = storage.fs_and_path(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def run_training(data: str, out: str, vae: str, cfg: TrainConfig, *, storage_path: str | None = None,
                 name: str = "dit") -> dict[str, Any]:
    """Train on DATA/latents and write a complete model directory to ``out``.

    Checkpoints go to ``storage_path/name`` (default: ``out/checkpoints/dit``); running again
    with the same storage path and name continues from the latest checkpoint there.
    Returns a summary (steps, final loss, where things are)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_utils import ensure_ray

    info = inspect_latents(data)
    dit_config = DiTConfig.preset(cfg.preset, in_channels=info["latent_channels"], patch_size=info["patch_size"],
                                  text_dim=info["text_dim"])
    if info["max_tokens"] > cfg.tokens_per_step:
        raise ValueError(f"the largest video has {info['max_tokens']} tokens, more than tokens_per_step="
                         f"{cfg.tokens_per_step}: raise the budget (--tokens-per-step)")
    if info["rows"] < cfg.workers:
        raise ValueError(f"{info['rows']} latents rows cannot feed {cfg.workers} workers")
    ensure_ray()
    data_fs, data_path = _pyarrow_fs(storage.join(data, "latents"))
    ds = ray.data.read_parquet(data_path, filesystem=data_fs, file_extensions=["parquet"],
                               num_cpus=cfg.read_cpus)
    spare = ray.cluster_resources().get("CPU", 0.0) - cfg.workers * cfg.cpus_per_worker
    if not cfg.cache_data and spare < cfg.read_cpus:
        # The workers would hold every CPU while the streaming read still needs one: Ray Data
        # and Ray Train then wait on each other forever. Read everything up front instead.
        print(f"[train] only {spare:g} CPUs left beside the {cfg.workers} workers: caching the latents "
              f"in the object store before training (as --cache-data)", flush=True)
        cfg = replace(cfg, cache_data=True)
    if cfg.cache_data:
        ds = ds.materialize()
    store_fs, store_path = _pyarrow_fs(storage_path or os.path.join(out, "checkpoints"))
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": asdict(cfg), "dit": asdict(dit_config)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=store_path, storage_filesystem=store_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        datasets={"train": ds},
    )
    result = trainer.fit()
    assert result.checkpoint is not None, "training reported no checkpoint"
    with result.checkpoint.as_directory() as d:
        summary = export_model(d, out, vae, info, cfg, data)
    summary["checkpoint"] = result.checkpoint.path
    return summary


def text_encoder_reference(name: str | None) -> str | None:
    """The index's text encoder path from the latents' ``text_encoder`` column: the offline
    MiniLM default is ``None``; anything else is the directory the encode stage used."""
    if name in DEFAULT_TEXT_ENCODERS:
        return None
    return os.path.abspath(name) if os.path.isdir(name) else name


def export_model(checkpoint_dir: str, out: str, vae: str, info: dict, cfg: TrainConfig, data: str) -> dict[str, Any]:
    """A checkpoint -> the model directory generation loads (see sora.model_dir): dit/ from
    the EMA weights, vae/ copied, model_index.json with the text encoder reference."""
    from safetensors.torch import load_file

    from sora.model_dir import default_index, write_index

    with open(os.path.join(checkpoint_dir, "state.json")) as f:
        state = json.load(f)
    dit = DiT(DiTConfig(**state["dit_config"]))
    dit.load_state_dict(load_file(os.path.join(checkpoint_dir, "ema.safetensors")), strict=True)
    os.makedirs(out, exist_ok=True)
    dit.save_pretrained(os.path.join(out, "dit"))
    if os.path.abspath(vae) != os.path.abspath(os.path.join(out, "vae")):
        shutil.copytree(vae, os.path.join(out, "vae"), dirs_exist_ok=True)
    losses = [l for _, l in state["history"] if math.isfinite(l)]
    tail = losses[-max(1, min(50, len(losses) // 10)):] if losses else []
    index = default_index()
    index["text_encoder"]["path"] = text_encoder_reference(info["text_encoder"])
    index["patch_size"] = list(info["patch_size"])
    # resolution_shift's clamp (sora.flow) is what training used
    index["flow"].update(base_shift=cfg.base_shift, base_tokens=cfg.base_tokens or 0, max_shift=8.0,
                         max_tokens=cfg.tokens_per_step)
    index["defaults"].update(fps=info["fps"], width=info["width"], height=info["height"], num_frames=info["num_frames"])
    index["training"] = {
        "data": data, "vae": info["vae"], "text_encoder": info["text_encoder"], "preset": cfg.preset,
        "steps": state["step"], "epochs": state["epoch"], "samples_seen": state["samples_seen"],
        "tokens_seen": state["tokens_seen"], "nonfinite_steps": state["nonfinite"],
        "final_loss": float(np.mean(tail)) if tail else None, "workers": cfg.workers, "seed": cfg.seed,
        "resumed_from": state["resumed_from"], "optimizer": cfg.optimizer, "lr": cfg.lr, "muon_lr": cfg.muon_lr,
        "fg_weight": cfg.fg_weight, "schedule": cfg.schedule, "final_lr": state.get("lr"),
    }
    write_index(out, index)
    return {"out": out, "steps": state["step"], "final_loss": index["training"]["final_loss"],
            "nonfinite": state["nonfinite"], "resumed_from": state["resumed_from"], "final_lr": state.get("lr"),
            "history": state["history"]}
