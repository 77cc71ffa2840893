"""`TrainConfig`: everything a training run needs besides the data, the VAE and where to write:
our DiT from scratch, or a diffusers Wan directory fine-tuned in full or with a LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from sora.flow import CONDITIONING_MODES, FlowConfig
from sora.optim import LRSchedule

OPTIMIZERS = ("adamw", "muon")
# The DiT's conditioning-mode mix (cond_mode_probs None): mostly text-to-video, the rest the
# clean-frame modes that image-to-video, extension and joining sample with.
DEFAULT_COND_MODES = {"none": 0.7, "first": 0.15, "first_k": 0.05, "last_k": 0.05, "first_last": 0.05}
DIT_BASE_SHIFT, DIT_BASE_TOKENS = 1.0, 256  # the DiT's timestep shift at 256 tokens (base_shift/base_tokens None)
# Linear layers that get a LoRA adapter by default: attention q, k, v, out of every block (sora.wan_lora)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class TrainConfig:
    """Steps are *iterations*: a step whose loss is not finite consumes its data and counts as
    a step, but makes no optimizer update (``optimizer updates = step - nonfinite``)."""

    preset: str = "tiny"  # DiT size (sora.dit.PRESETS); channels, patch and text width come from the data
    # a diffusers Wan directory (sora.wan) to fine-tune instead of training our DiT of `preset`
    init: str | None = None
    lora_rank: int | None = None  # with init: train a LoRA adapter of this rank on the frozen model (None: every weight)
    lora_alpha: float | None = None  # LoRA alpha: the adapter's update is scaled by alpha / rank (None: rank)
    lora_targets: tuple[str, ...] = LORA_TARGETS  # LoRA: the linear layers whose names end with one of these
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
    # a progress line from rank 0 every this many steps (with it a metrics report, at most every 10 s)
    log_every_steps: int = 10
    p_uncond: float = 0.1  # probability that a video's prompt is dropped (classifier-free guidance)
    # probability of each conditioning mode (sora.flow.CONDITIONING_MODES): clean frames the model learns to fill
    # around (None: DEFAULT_COND_MODES, less the modes the model cannot take, e.g. all but "none" for Wan 2.1 T2V)
    cond_mode_probs: dict[str, float] | None = None
    # timestep shift at base_tokens tokens per video (None: 1.0 for the DiT, the init model's scheduler shift)
    base_shift: float | None = None
    # tokens per video where the shift is base_shift, 0: base_shift for every size (None: 256 for the DiT, 0 with init)
    base_tokens: int | None = None
    seed: int = 0  # model init, data order and per-step noise
    shuffle_buffer_rows: int = 256  # local shuffle buffer of each worker's stream (0: off)
    # CPUs per Ray Data read task of the latents; 0: reads never wait for a CPU beside the workers
    read_cpus: float = 0.0
    # read DATA/latents into Ray's object store once and keep each worker's samples in memory
    # after the first epoch (only for data that fits in memory)
    cache_data: bool = False
    # without cache_data: each worker still keeps its samples in memory after its first whole epoch,
    # and reshuffles them there instead of reading DATA/latents again, when all the latents take at
    # most this many MB as float32 samples (0: read every epoch)
    keep_samples_mb: float = 256.0
    bf16: bool = True  # GPU: autocast to bfloat16 (FSDP: bf16 compute, fp32 reduce)
    fsdp: bool = True  # GPU with 2+ workers: FSDP2 (fully_shard per block, then the root) instead of DDP
    activation_checkpointing: bool = False  # GPU: recompute each block in backward
    compile: bool = False  # GPU: torch.compile each block
    peak_flops: float | None = None  # peak FLOP/s per worker for MFU (None: by GPU name, none on CPU)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.lora_targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
        if self.max_steps is None and self.max_minutes is None:
            raise ValueError("set max_steps or max_minutes (or both): the run needs an end")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if not (self.lr > 0 and (self.muon_lr is None or self.muon_lr > 0)):
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, muon_lr={self.muon_lr}")
        if self.placement not in ("pack", "spread"):
            raise ValueError(f"placement must be pack or spread, got {self.placement!r}")
        if self.keep_samples_mb < 0:
            raise ValueError(f"keep_samples_mb must be >= 0 (0: read the latents every epoch), got {self.keep_samples_mb}")
        if self.tokens_per_step <= 0 or self.workers < 1:
            raise ValueError(f"need tokens_per_step > 0 and workers >= 1, got {self.tokens_per_step}, {self.workers}")
        self.lr_schedule()  # checks schedule, min_lr_ratio, cooldown_fraction, warmup_steps
        if self.optimizer == "muon" and self.use_gpu and self.fsdp and self.workers > 1:
            raise ValueError("optimizer='muon' needs whole weight matrices, but FSDP shards them: "
                             "set fsdp=False (DDP) or use optimizer='adamw'")
        if self.init is None and self.lora_rank is not None:
            raise ValueError("lora_rank needs init (a diffusers Wan directory to adapt): our DiT trains every weight")
        if self.init is not None and self.optimizer != "adamw":
            raise ValueError("fine-tuning an init model trains with optimizer='adamw' (Muon's weight split is the "
                             "DiT's): leave --optimizer out")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"lora_targets must name linear layers, e.g. {','.join(LORA_TARGETS)}; "
                             f"got {self.lora_targets!r}")
        if self.cond_mode_probs is not None:
            probs = self.cond_mode_probs
            unknown = sorted(set(probs) - set(CONDITIONING_MODES))
            if unknown or any(p < 0 for p in probs.values()) or not sum(probs.values()) > 0:
                raise ValueError(f"cond_mode_probs must give modes of {list(CONDITIONING_MODES)} probabilities >= 0 "
                                 f"with a positive sum, got {probs}")
        if self.base_shift is not None and not self.base_shift > 0:
            raise ValueError(f"base_shift must be > 0, got {self.base_shift}")
        if self.base_tokens is not None and self.base_tokens < 0:
            raise ValueError(f"base_tokens must be >= 0 (0: one shift for every size), got {self.base_tokens}")

    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(lr=self.lr, warmup_steps=self.warmup_steps, decay=self.schedule,
                          min_lr_ratio=self.min_lr_ratio, cooldown_fraction=self.cooldown_fraction,
                          max_steps=self.max_steps)

    def for_model(self, conditioning_modes: tuple[str, ...], shift: float | None = None) -> "TrainConfig":
        """This config with its model-dependent defaults (the None fields) decided for a model that
        takes ``conditioning_modes`` (``sora.denoiser.DenoiserSpec``) and, for an init model,
        samples with the flow ``shift`` of its scheduler: the DiT mix of conditioning modes less
        those the model cannot take, and the DiT's resolution-dependent shift or the init model's
        fixed one."""
        probs = self.cond_mode_probs
        if probs is None:
            probs = {m: p for m, p in DEFAULT_COND_MODES.items() if m in conditioning_modes}
            probs = {m: p / sum(probs.values()) for m, p in probs.items()}
        wan = self.init is not None
        base_shift = self.base_shift if self.base_shift is not None else (
            float(shift) if wan and shift is not None else DIT_BASE_SHIFT)
        base_tokens = self.base_tokens if self.base_tokens is not None else (0 if wan else DIT_BASE_TOKENS)
        return replace(self, cond_mode_probs=dict(probs), base_shift=base_shift, base_tokens=base_tokens)

    def flow(self) -> FlowConfig:
        """The timestep, conditioning and text-dropout draws (defaults as `for_model` for the DiT)."""
        cfg = self if self.cond_mode_probs is not None and self.base_shift is not None and \
            self.base_tokens is not None else self.for_model(CONDITIONING_MODES)
        return FlowConfig(shift=cfg.base_shift, base_tokens=cfg.base_tokens or None,
                          cond_mode_probs=dict(cfg.cond_mode_probs), p_uncond=cfg.p_uncond)
