"""Optimizers and learning-rate schedules for every model we train (DiT, VAE, captioner, upsampler).

- `LRSchedule` and `lr_at`: one stateless schedule (linear warmup, then constant, cosine or a
  final linear cooldown). A function of the step and of the run's elapsed fraction of its time
  budget, so resuming needs no scheduler state.
- `Muon`: orthogonalised momentum for weight matrices and convolution kernels, optionally with
  its Newton-Schulz work split over data-parallel ranks.
- `Optimizers`: several torch optimizers stepped as one (Muon + AdamW).
- `make_optimizers`: AdamW alone, or Muon on the named hidden weights and AdamW on the rest.

Tiny CPU run:

    opt = make_optimizers(model, lr=1e-3, muon=[n for n, p in model.named_parameters() if p.dim() == 2])
    for step, x in enumerate(batches, start=1):
        opt.set_lr(lr_at(step, LRSchedule(lr=1e-3, warmup_steps=10, decay="cosine", max_steps=100)))
        loss(model, x).backward()
        opt.step()
        opt.zero_grad()

This module creates no process group: `Muon(across_ranks=True)` uses the default group that the
caller (Ray Train) has initialised.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

DECAYS = ("constant", "cosine", "cooldown")


@dataclass
class LRSchedule:
    """A learning-rate schedule: warmup, then `decay` (see `lr_at`)."""

    lr: float  # peak learning rate
    warmup_steps: int = 0  # linear warmup from 0 to lr over the first this many steps
    decay: str = "constant"  # after warmup: "constant", "cosine" or "cooldown"
    min_lr_ratio: float = 0.1  # where "cosine" and "cooldown" end, as a fraction of lr
    cooldown_fraction: float = 0.2  # "cooldown": the last fraction of the run it takes
    max_steps: int | None = None  # the run's length in steps (None: only the clock's progress counts)

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"the schedule after warmup must be constant, cosine or cooldown, got {self.decay!r}")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.cooldown_fraction <= 1:
            raise ValueError(f"cooldown_fraction must be in (0, 1], got {self.cooldown_fraction}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


def lr_at(step: int, schedule: LRSchedule, time_progress: float = 0.0) -> float:
    """Learning rate of 1-based ``step``.

    Linear warmup to ``lr`` over ``warmup_steps``; then ``lr`` ("constant"); a cosine from
    ``lr`` at the end of warmup to ``min_lr_ratio * lr`` at the end of the run ("cosine",
    Loshchilov & Hutter 2017); or ``lr`` until the last ``cooldown_fraction`` of the run, then
    linear to ``min_lr_ratio * lr`` ("cooldown", the warmup-stable-decay shape, Hu et al. 2024).
    The run's progress is whichever is further along: steps (of ``max_steps``) or
    ``time_progress``, the elapsed fraction of a time budget (0 without one), so a run stopped
    by its clock still anneals. Returns a plain float (optimizer state stays weights_only
    loadable)."""
    s = schedule
    if s.warmup_steps > 0 and step <= s.warmup_steps:
        return float(s.lr * step / s.warmup_steps)
    if s.decay == "constant":
        return float(s.lr)
    if s.decay == "cooldown":
        progress = max(step / s.max_steps if s.max_steps else 0.0, time_progress)
        left = min(1.0, max(0.0, (1.0 - progress) / s.cooldown_fraction))  # 1 until the cooldown starts
        return float(s.lr * (s.min_lr_ratio + (1.0 - s.min_lr_ratio) * left))
    by_steps = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps) if s.max_steps else 0.0
    progress = min(1.0, max(by_steps, time_progress, 0.0))
    return float(s.lr * (s.min_lr_ratio + (1.0 - s.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))))


# ----------------------------------------------------------------------------------------
# Muon
# ----------------------------------------------------------------------------------------

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # K. Jordan's quintic Newton-Schulz coefficients


def budget_fraction(elapsed_s: float, budget_s: float, world: int = 1) -> float:
    """How much of a time budget is spent. With ``world`` > 1 data-parallel ranks (a process
    group initialised), rank 0's figure is broadcast, so every rank follows the same schedule
    and stops at the same step."""
    frac = elapsed_s / budget_s
    if world > 1:
        sync = torch.tensor([frac], dtype=torch.float64)
        torch.distributed.broadcast(sync, src=0)
        frac = float(sync[0])
    return frac


def mean_over_ranks(value: float, world: int = 1) -> float:
    """The mean of a per-rank figure (a logged loss) over ``world`` data-parallel ranks."""
    if world <= 1:
        return value
    mean = torch.tensor([value / world])
    torch.distributed.all_reduce(mean)
    return float(mean[0])


def orthogonalize(G: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately the nearest semi-orthogonal matrix to G (m, n): U V^T of its SVD.

    Muon's quintic Newton-Schulz iteration (K. Jordan et al., "Muon", 2024): after scaling G to
    unit Frobenius norm, X <- a X + (b A + c A^2) X with A = X X^T pushes every singular value
    towards 1; the coefficients are tuned to land them in ~[0.7, 1.2] in five steps, which is
    all Muon needs. Works on the short side (A is min(m, n) square). Computed in ``dtype``
    with the same operations as ``torch.optim.Muon`` (bfloat16 there), so the results match it
    bit for bit in bfloat16. Returns (m, n) in ``dtype``; G is not modified.
    """
    assert G.dim() == 2, f"orthogonalize needs a matrix, got shape {tuple(G.shape)}"
    a, b, c = coefficients
    tall = G.shape[0] > G.shape[1]
    X = G.to(dtype)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        A = X @ X.T  # (m, m), m = the short side
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return X.T if tall else X


@functools.lru_cache(maxsize=None)
def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where matrix products have a fast bfloat16 path (a GPU; a CPU with AVX512-BF16 or
    AMX, as oneDNN reports it), else float32: on a CPU without one (e.g. AVX2 only) a bfloat16
    product is emulated, 20-200x slower than float32 (docs/experiments.md, "Speed on CPU")."""
    if device.type != "cpu":
        return torch.bfloat16
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return torch.float32


def orthogonalize_across_ranks(updates: list[torch.Tensor], orthogonalize_fn: Callable[[torch.Tensor], torch.Tensor]
                               ) -> list[torch.Tensor]:
    """``[orthogonalize_fn(u) for u in updates]`` (as float32), each computed on ONE data-parallel rank.

    For optimizers of replicated models (DDP): every rank holds the same reduced gradients, so
    every rank would run the same Newton-Schulz iterations; instead each matrix goes to one rank
    (largest first, to the least loaded; the same plan everywhere), and one all-reduce of a flat
    float32 buffer, zero where a rank did not compute, gives every rank all results. The values
    are exactly those of the unsplit loop (a sum with zeros is exact). Without an initialised
    default process group of 2+ ranks it is the plain loop. Only for updates that really are
    identical on every rank.
    """
    dist = torch.distributed
    if not updates or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return [orthogonalize_fn(u) for u in updates]
    world, rank = dist.get_world_size(), dist.get_rank()
    load, owner = [0.0] * world, [0] * len(updates)
    for i in sorted(range(len(updates)), key=lambda i: -updates[i].numel() * min(updates[i].shape)):
        owner[i] = min(range(world), key=load.__getitem__)  # Newton-Schulz costs ~ m * n * min(m, n)
        load[owner[i]] += updates[i].numel() * min(updates[i].shape)
    sizes = [u.numel() for u in updates]
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=updates[0].device)
    parts = flat.split(sizes)
    for u, part, who in zip(updates, parts, owner):
        if who == rank:
            part.copy_(orthogonalize_fn(u).reshape(-1))
    dist.all_reduce(flat)
    return [part.view(u.shape) for u, part in zip(updates, parts)]


class Muon(torch.optim.Optimizer):
    """Muon (K. Jordan et al. 2024): momentum, orthogonalised by Newton-Schulz, for the hidden
    weight matrices and convolution kernels of a network.

    A (C_out, C_in, *k) kernel is orthogonalised as its (C_out, C_in * prod(k)) matrix, the view
    a convolution multiplies by. Per parameter, with g its gradient and W its matrix view:

        buf <- mu * buf + (1 - mu) * g;   u = (1 - mu) * g + mu * buf   (nesterov; else u = buf)
        W   <- W * (1 - lr * weight_decay) - lr * s * orthogonalize(u)

    s = 0.2 * sqrt(max(m, n)) ("match_rms_adamw": the update gets AdamW's typical RMS, Liu et
    al., "Muon is scalable for LLM training", 2025, so ``lr`` means what it means for AdamW) or
    sqrt(max(1, m / n)) ("original"). On 2-D weights this is ``torch.optim.Muon``'s update, bit
    for bit with ``ns_dtype=torch.bfloat16``; the state is the same (``momentum_buffer``).
    ns_dtype None: `newton_schulz_dtype` of the parameter's device.
    Biases, norms, embeddings and the first and last layers belong with AdamW.

    across_ranks: the model is replicated over the default process group (DDP), so each
    matrix's Newton-Schulz runs on one rank only (`orthogonalize_across_ranks`); the same
    numbers as without it.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, adjust_lr_fn: str = "match_rms_adamw", ns_dtype: torch.dtype | None = None,
                 across_ranks: bool = False):
        if not (lr >= 0 and 0 <= momentum < 1 and weight_decay >= 0):
            raise ValueError(f"Muon needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0; got {lr}, {momentum}, "
                             f"{weight_decay}")
        if adjust_lr_fn not in ("match_rms_adamw", "original"):
            raise ValueError(f"adjust_lr_fn must be 'match_rms_adamw' or 'original', got {adjust_lr_fn!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients), eps=eps,
                                      adjust_lr_fn=adjust_lr_fn))
        self.ns_dtype, self.across_ranks = ns_dtype, across_ranks
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon updates matrices and kernels, got a {p.dim()}-D parameter "
                                     f"{tuple(p.shape)}: give it to AdamW")

    @staticmethod
    def _scale(shape: torch.Size, adjust_lr_fn: str) -> float:
        m, n = shape
        return 0.2 * math.sqrt(max(m, n)) if adjust_lr_fn == "match_rms_adamw" else math.sqrt(max(1.0, m / n))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu = group["momentum"]
            params, updates = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                u = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                params.append(p)
                updates.append(u.reshape(p.shape[0], -1))  # (C_out, fan_in)
            ortho = lambda u: orthogonalize(u, group["ns_steps"], group["ns_coefficients"], group["eps"],  # noqa: E731
                                            self.ns_dtype or newton_schulz_dtype(u.device))
            results = (orthogonalize_across_ranks(updates, ortho) if self.across_ranks
                       else [ortho(u) for u in updates])
            lr = float(group["lr"])
            for p, u, o in zip(params, updates, results):
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(o.reshape(p.shape), alpha=-lr * self._scale(u.shape, group["adjust_lr_fn"]))
        return loss


# ----------------------------------------------------------------------------------------
# Several optimizers as one
# ----------------------------------------------------------------------------------------


class Optimizers(list):
    """One or more torch optimizers stepped together (AdamW alone, or Muon + AdamW).

    A list, so ``torch.distributed.checkpoint.state_dict`` saves and loads all of them as one
    state dict; ``param_groups`` spans them all. Each group's ``lr_scale`` multiplies the
    schedule's learning rate (`set_lr`)."""

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self for g in opt.param_groups]

    def set_lr(self, lr: float) -> None:
        for g in self.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        for opt in self:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self:
            opt.zero_grad(set_to_none=set_to_none)


def make_optimizers(model: nn.Module, *, lr: float, muon: Iterable[str] = (), muon_lr: float | None = None,
                    weight_decay: float = 0.0, decays: Callable[[str, torch.Tensor], bool] | None = None,
                    betas: tuple[float, float] = (0.9, 0.999), muon_momentum: float = 0.95,
                    ns_dtype: torch.dtype | None = None, across_ranks: bool = False) -> Optimizers:
    """AdamW over ``model``'s parameters, or `Muon` over those named in ``muon`` (first in the
    list) and AdamW over the rest.

    weight_decay: applied to the parameters ``decays(name, param)`` selects (default: those of
    2 or more dims, never norms, biases or gains) and to every Muon weight. muon_lr: the Muon
    part's learning rate (default ``lr``), kept as its group's ``lr_scale`` so `lr_at` drives
    both. across_ranks: see `Muon`."""
    decays = decays or (lambda name, p: p.dim() >= 2)
    named = list(model.named_parameters())
    in_muon = set(muon)
    missing = in_muon - {n for n, _ in named}
    assert not missing, f"no such parameters for Muon: {sorted(missing)[:5]}"
    rest = [(n, p) for n, p in named if n not in in_muon]
    if weight_decay:
        groups = [{"params": [p for n, p in rest if decays(n, p)], "weight_decay": weight_decay},
                  {"params": [p for n, p in rest if not decays(n, p)], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in rest], "weight_decay": 0.0}]
    groups = [{**g, "lr_scale": 1.0} for g in groups if g["params"]]
    opts = Optimizers([torch.optim.AdamW(groups, lr=lr, betas=betas)] if groups else [])
    if in_muon:
        scale = muon_lr / lr if muon_lr else 1.0
        opts.insert(0, Muon([{"params": [p for n, p in named if n in in_muon], "lr_scale": scale}], lr=lr * scale,
                            weight_decay=weight_decay, momentum=muon_momentum, ns_dtype=ns_dtype,
                            across_ranks=across_ranks))
    return opts
