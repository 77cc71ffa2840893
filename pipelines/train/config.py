"""`TrainConfig`: everything a DiT training run needs besides the data, the VAE and where to write."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sora.flow import FlowConfig
from sora.optim import LRSchedule

OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    """Steps are *iterations*: a step whose loss is not finite consumes its data and counts as
    a step, but makes no optimizer update (``optimizer updates = step - nonfinite``)."""

    preset: str = "tiny"  # DiT size (sora.dit.PRESETS); channels, patch and text width come from the data
    workers: int = 2  # Ray Train workers (one process each; one GPU each with use_gpu)
    cpus_per_worker: float = 1.0  # CPUs reserved per worker; torch threads per worker = max(1, int(this)) on CPU
    # worker placement on nodes: "pack" (as few nodes as hold them) or "spread" (each on another node where it can)
    placement: Literal["pack", "spread"] = "pack"
    use_gpu: bool = False  # one GPU per worker: FSDP2 and bf16 (see fsdp, bf16)
    max_steps: int | None = 2000  # stop at this global step (None: only max_minutes)
    max_minutes: float | None = None  # stop after this much wall time of this run (None: only max_steps)
    # token budget of one pack per worker per step (NaViT packing); must hold the largest video
    tokens_per_step: int = 4096
    max_samples_per_pack: int | None = None  # cap on videos per pack (None: the token budget only)
    lr: float = 1e-4  # peak learning rate (of AdamW, and of Muon unless muon_lr is set)
    # "adamw", or "muon": sora.optim.Muon on the blocks' 2-D weight matrices, AdamW on the rest
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float | None = None  # learning rate of the Muon part (None: lr)
    muon_momentum: float = 0.95  # Muon's momentum
    warmup_steps: int = 100  # linear warmup from 0 to lr over this many steps
    # after warmup (sora.optim.lr_at): "constant", "cosine" (to min_lr_ratio x lr at the end) or
    # "cooldown" (constant, then linear to min_lr_ratio x lr over the last cooldown_fraction)
    schedule: Literal["constant", "cosine", "cooldown"] = "constant"
    min_lr_ratio: float = 0.1  # where cosine and cooldown end, as a fraction of lr
    cooldown_fraction: float = 0.2  # share of the run (steps or minutes, whichever is further) the cooldown takes
    weight_decay: float = 0.0  # decoupled weight decay of matrices (never norms, biases, embeddings of size D)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's betas
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping; the norm is still logged)
    # decay of the EMA of the weights (the exported model), ramped as min(decay, (1 + n) / (10 + n))
    ema_decay: float = 0.9999
    checkpoint_every_steps: int = 500  # a checkpoint every this many steps
    checkpoint_every_minutes: float | None = 15.0  # and every this many minutes (None: by steps only)
    keep_checkpoints: int = 2  # checkpoints kept in storage (older ones are deleted)
    max_failures: int = 3  # worker-group restarts from the last checkpoint before giving up
    log_every_steps: int = 10  # a metrics report and one progress line from rank 0 every this many steps
    p_uncond: float = 0.1  # probability that a video's prompt is dropped (classifier-free guidance)
    # probability of each conditioning mode (sora.flow.CONDITIONING_MODES): clean frames the model learns to fill around
    cond_mode_probs: dict[str, float] = field(
        default_factory=lambda: {"none": 0.7, "first": 0.15, "first_k": 0.05, "last_k": 0.05, "first_last": 0.05}
    )
    base_shift: float = 1.0  # timestep shift at base_tokens tokens per video (sora.flow.resolution_shift)
    base_tokens: int | None = 256  # tokens per video where the shift is base_shift (None: base_shift for every size)
    seed: int = 0  # model init, data order and per-step noise
    shuffle_buffer_rows: int = 256  # local shuffle buffer of each worker's stream (0: off)
    read_cpus: float = 0.25  # CPUs per Ray Data read task
    # read DATA/latents into Ray's object store once and keep each worker's samples in memory
    # after the first epoch (only for data that fits in memory)
    cache_data: bool = False
    bf16: bool = True  # GPU: autocast to bfloat16 (FSDP: bf16 compute, fp32 reduce)
    fsdp: bool = True  # GPU with 2+ workers: FSDP2 (fully_shard per block, then the root) instead of DDP
    activation_checkpointing: bool = False  # GPU: recompute each block in backward
    compile: bool = False  # GPU: torch.compile each block
    peak_flops: float | None = None  # peak FLOP/s per worker for MFU (None: by GPU name, none on CPU)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.max_steps is None and self.max_minutes is None:
            raise ValueError("set max_steps or max_minutes (or both): the run needs an end")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if not (self.lr > 0 and (self.muon_lr is None or self.muon_lr > 0)):
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, muon_lr={self.muon_lr}")
        if self.placement not in ("pack", "spread"):
            raise ValueError(f"placement must be pack or spread, got {self.placement!r}")
        if self.tokens_per_step <= 0 or self.workers < 1:
            raise ValueError(f"need tokens_per_step > 0 and workers >= 1, got {self.tokens_per_step}, {self.workers}")
        self.lr_schedule()  # checks schedule, min_lr_ratio, cooldown_fraction, warmup_steps
        if self.optimizer == "muon" and self.use_gpu and self.fsdp and self.workers > 1:
            raise ValueError("optimizer='muon' needs whole weight matrices, but FSDP shards them: "
                             "set fsdp=False (DDP) or use optimizer='adamw'")

    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(lr=self.lr, warmup_steps=self.warmup_steps, decay=self.schedule,
                          min_lr_ratio=self.min_lr_ratio, cooldown_fraction=self.cooldown_fraction,
                          max_steps=self.max_steps)

    def flow(self) -> FlowConfig:
        return FlowConfig(shift=self.base_shift, base_tokens=self.base_tokens,
                          cond_mode_probs=dict(self.cond_mode_probs), p_uncond=self.p_uncond)
