"""The per-worker training loop on Ray Train (our DiT, or a Wan denoiser fine-tuned in full or
with LoRA: ``pipelines.train.models``): parallelize, optimizers, one step, the loop."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from pipelines import trainer
from pipelines.train.checkpoint import EMA, load_checkpoint
from pipelines.train.config import TrainConfig
from pipelines.train.data import iter_cached_packs, iter_packs
from sora.dit import DiT, DiTConfig, pack_flops, peak_bf16_flops
from sora.flow import FlowConfig, flow_matching_loss
from sora.optim import Optimizers, lr_at, make_optimizers
from sora.packing import Sample, pack

# The loss curve kept in state.json (every step; the oldest are dropped past this many).
HISTORY_STEPS = 100_000


# loss_fn(model, batch, flow, generator) -> (loss, stats): sora.flow.flow_matching_loss by default
LossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


def parallelize(model: nn.Module, cfg: TrainConfig, device: torch.device, world_size: int) -> nn.Module:
    """Wrap a denoiser (a DiT, or a ``sora.wan.WanDenoiser``: both have ``blocks`` and
    ``gradient_checkpointing``) for data-parallel training; the model itself stays parallelism-free.

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
        model.gradient_checkpointing = True  # the model's own per-block torch.utils.checkpoint
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


def muon_parameter_names(model: DiT) -> list[str]:
    """The weights Muon updates: every 2-D matrix inside the transformer blocks (attention,
    cross-attention, MLP, adaLN modulation). Embeddings in and out stay with AdamW."""
    return [n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]


def make_optimizer(model: DiT, cfg: TrainConfig, sharded: bool = False, data_parallel: bool = False) -> Optimizers:
    """The optimizer(s) of ``cfg.optimizer`` over ``model``'s parameters (after parallelize).
    Weight decay goes to matrices only. ``sharded``: the parameters are FSDP shards, which
    Muon cannot orthogonalise (it needs whole matrices). ``data_parallel``: the model is
    replicated (DDP), so Muon splits its Newton-Schulz work over the ranks."""
    muon = muon_parameter_names(model) if cfg.optimizer == "muon" else []
    if muon and sharded:
        raise ValueError("optimizer='muon' needs whole weight matrices, but FSDP shards them: "
                         "train with fsdp=False (DDP) or optimizer='adamw'")
    return make_optimizers(model, lr=cfg.lr, muon=muon, muon_lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                           decays=lambda n, p: p.dim() >= 2 and "null_text" not in n, betas=cfg.betas,
                           muon_momentum=cfg.muon_momentum, across_ranks=data_parallel)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a parameter-like tensor (gathers an FSDP2 DTensor: a collective)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().contiguous()


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
        return peak_bf16_flops(name)
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


def train_step(model: nn.Module, samples: list[Sample], step: int, optimizer: Optimizers, cfg: TrainConfig,
               flow: FlowConfig, flops: DiTConfig | Callable[[list[Sample]], float], device: torch.device, rank: int,
               world: int, autocast, time_progress: float = 0.0, loss_fn: LossFn = flow_matching_loss
               ) -> dict[str, float]:
    """One synchronous step on one pack (or same-shape batch) per worker. ``flops``: the DiT's
    config (``sora.dit.pack_flops``) or a function giving a pack's training FLOPs. Returns
    global figures: loss (NaN when skipped), grad_norm, real tokens, flops, rows, skipped (1.0
    when the loss or the gradient was not finite on any worker: then no optimizer update
    happens anywhere), lr (the schedule's, before each group's lr_scale)."""
    batch = pack(samples).to(device)
    lr = lr_at(step, cfg.lr_schedule(), time_progress)
    optimizer.set_lr(lr)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 4099 + rank)  # stateless per step
    with autocast:
        loss, stats = loss_fn(model, batch, flow, generator)
    loss_sum, loss_n, real, flops, rows, bad = _all_reduce(
        [loss.item() * stats["loss_tokens"], stats["loss_tokens"], batch.num_tokens,
         flops(samples) if callable(flops) else pack_flops(samples, flops),
         len(samples), not math.isfinite(loss.item())], device, world)
    loss.backward()  # always, on every rank: DDP/FSDP collectives must match across ranks
    trainable = [p for p in model.parameters() if p.requires_grad]
    norm = float(_full(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or float("inf"))))
    skipped = bool(bad) or not math.isfinite(norm)  # norm is global: grads are already reduced
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float("nan") if skipped else loss_sum / max(loss_n, 1.0), "grad_norm": norm, "tokens": real,
            "flops": flops, "rows": rows, "skipped": float(skipped), "lr": lr}


def build_model(config: dict, cfg: TrainConfig, device: torch.device, world: int
                ) -> tuple[nn.Module, nn.Module, Optimizers, DiTConfig | Callable[[list[Sample]], float]]:
    """(core, the module to call, its optimizer(s), the FLOPs of a pack) on this worker: our DiT
    from ``config["dit"]`` (random init, the same on every rank), or the Wan directory of
    ``config["wan"]`` (its weights; AdamW over what requires grad)."""
    from pipelines.train.models import adamw_trainable, build_wan

    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP/FSDP also sync it)
    if config.get("wan"):
        core, flops = build_wan(config["wan"], device)
    else:
        core = DiT(DiTConfig.from_dict(config["dit"]))
        flops = core.config
    model = parallelize(core, cfg, device, world)  # the optimizer must see the (sharded) params after this
    sharded = device.type == "cuda" and cfg.fsdp and world > 1
    if config.get("wan"):
        optimizer = adamw_trainable(core, cfg)
    else:
        optimizer = make_optimizer(core, cfg, sharded=sharded, data_parallel=world > 1 and not sharded)
    return core, model, optimizer, flops


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config = {"train": asdict(TrainConfig), "model": ModelPlan.identity(),
    "dit": asdict(DiTConfig)}`` or ``"wan": {...}`` (``ModelPlan.loop_config``), and optionally
    ``"loss_fn"`` (see `train_step`; default sora.flow.flow_matching_loss), ``"keep_samples"``
    (each worker keeps its samples after its first whole epoch; default ``cache_data``)."""
    import ray.train
    import ray.train.torch

    from sora.denoiser import spec_of

    cfg = TrainConfig(**config["train"])
    identity = config.get("model") or {"kind": "dit", "init": None, "lora": None}
    loss_fn = config.get("loss_fn") or flow_matching_loss
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    core, model, optimizer, flops = build_model(config, cfg, device, world)
    by_grid = not spec_of(core).packed  # one shape per step where a forward cannot mix shapes cheaply
    trainable_only = not all(p.requires_grad for p in core.parameters())
    ema = EMA(core, cfg.ema_decay)
    flow = cfg.flow()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)
    peak = _peak_flops(cfg, device)

    state = {"step": 0, "epoch": 0, "epoch_rows": 0, "samples_seen": 0, "tokens_seen": 0, "nonfinite": 0,
             "seed": cfg.seed, "resumed_from": [], "history": [], "optimizer": cfg.optimizer, "workers": world,
             "model": identity} | ({"dit_config": config["dit"]} if config.get("dit") else {})
    checkpoint = ray.train.get_checkpoint()  # set on a restart after a failure and on a re-run
    if checkpoint is not None:  # any number of workers may have written it
        state = load_checkpoint(trainer.checkpoint_url(checkpoint), model, optimizer, ema, identity=identity)
        state["resumed_from"].append(state["step"])
        state["workers"] = world
        state["model"] = identity
    if rank == 0:
        n_all = sum(p.numel() for p in core.parameters())
        n_train = sum(p.numel() for p in core.parameters() if p.requires_grad)
        print(f"[train] rank 0 of {world} on {device}: {spec_of(core).name}, {n_all / 1e6:.2f}M params"
              f"{f' ({n_train / 1e6:.3f}M trained)' if n_train < n_all else ''}, "
              f"{'resuming at step ' + str(state['step']) if checkpoint else 'from scratch'}", flush=True)

    shard = ray.train.get_dataset_shard("train")
    t_start = t_ckpt = t_report = time.monotonic()
    window, metrics = Window(), {}
    last_ckpt_step, reported_checkpoint = state["step"], False
    done = cfg.max_steps is not None and state["step"] >= cfg.max_steps

    def report(with_checkpoint: bool) -> None:  # every rank, at the same steps (a barrier)
        nonlocal t_ckpt, t_report, last_ckpt_step, reported_checkpoint
        t_report = time.monotonic()
        if not with_checkpoint:
            trainer.report(metrics)
            return
        trainer.report({**metrics, "checkpoint_step": state["step"]}, model=model, optimizers=optimizer,
                       state={**state, "ema_updates": ema.updates}, extra=ema.shadow, trainable_only=trainable_only)
        t_ckpt, last_ckpt_step, reported_checkpoint = time.monotonic(), state["step"], True

    # this worker's samples, once it has read a whole epoch of its shard (a restarted group starts
    # without them: its first epoch, whole or resumed inside, reads the shard)
    keep = config.get("keep_samples", cfg.cache_data)
    cached: list[Sample] | None = None
    while not done:
        # the resume point inside an epoch, in rows per worker (the rows seen are a global count)
        skip = state["epoch_rows"] // world
        collected: list[Sample] | None = [] if cached is None and keep else None
        if cached is not None:
            packs = iter_cached_packs(cached, cfg, state["epoch"], rank, skip_rows=skip, by_grid=by_grid)
        else:  # from the shard; ``collected`` gets all of it, the rows skipped too
            packs = iter_packs(shard, cfg, state["epoch"], rank, skip_rows=skip, by_grid=by_grid, keep=collected)
        steps_this_epoch = 0
        while not done:
            samples = next(packs, None)
            now = time.monotonic()
            # One collective decides for everyone (clocks and shards differ between workers):
            # [workers with a pack, time is up, time to checkpoint, elapsed fraction of max_minutes
            # (the schedule's clock), a metrics report may be sent], the last four by rank 0's clock
            have, out_of_time, ckpt_due, time_progress, report_due = _all_reduce([
                samples is not None,
                rank == 0 and cfg.max_minutes is not None and now - t_start >= 60 * cfg.max_minutes,
                rank == 0 and cfg.checkpoint_every_minutes is not None and now - t_ckpt >= 60 * cfg.checkpoint_every_minutes,
                (now - t_start) / (60 * cfg.max_minutes) if rank == 0 and cfg.max_minutes else 0.0,
                rank == 0 and now - t_report >= trainer.METRICS_EVERY_S,
            ], device, world)
            if have < world:
                break  # a worker's shard is exhausted: the epoch ends for all (lockstep DDP)
            step = state["step"] + 1
            out = train_step(model, samples, step, optimizer, cfg, flow, flops, device, rank, world, autocast,
                             time_progress, loss_fn)
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
                         tokens_seen=state["tokens_seen"] + int(out["tokens"]))
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
                if ckpt_now or report_due:  # metrics alone at most every METRICS_EVERY_S (see trainer)
                    report(with_checkpoint=ckpt_now)
                window = Window()
        if not done:
            assert steps_this_epoch > 0 or state["epoch_rows"] > 0, (
                "an epoch produced no step: some worker got no data (fewer latents rows than workers?)")
            if collected is not None:
                for _ in packs:  # read what the lockstep stop left unread (into ``collected``)
                    pass
                cached = collected
            state["epoch"] += 1
            state["epoch_rows"] = 0
    if state["step"] != last_ckpt_step or not reported_checkpoint:
        # the final state is always this run's latest checkpoint (also when a re-run had
        # nothing left to do), so the driver exports exactly what training ended with
        report(with_checkpoint=True)
