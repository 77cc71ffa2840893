r"""Rectified flow (flow matching on straight paths) as pure functions.

Convention (Liu et al. 2022, "Flow Straight and Fast"; Esser et al. 2024, SD3): t = 0 is
data, t = 1 is noise, and the path between a data point :math:`x_0` and noise
:math:`\epsilon \sim N(0, I)` is the straight line

.. math::  x_t = (1 - t)\,x_0 + t\,\epsilon, \qquad v = \frac{dx_t}{dt} = \epsilon - x_0 .

The model learns :math:`v_\theta(x_t, t) \approx E[\epsilon - x_0 \mid x_t]` with an MSE
loss; sampling integrates :math:`dx/dt = v_\theta` from t = 1 down to t = 0.

Timesteps are drawn from a logit-normal (SD3, Sec. 3.1) and *shifted* towards noise for
larger inputs (SD3, Sec. 5.3.2): more tokens carry more redundant signal, so the same noise
level destroys less of the image and training must spend more time at high t.

Conditioning frames: known latent frames (the image in image-to-video, the context in
extension, keyframes in interpolation) enter as clean tokens with t = 0 inside a noisy video
and are excluded from the loss; the model learns to fill in the rest. One mechanism, every
generation mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

CONDITIONING_MODES = ("none", "first", "first_k", "last_k", "first_last")


def _expand(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """Give per-row t (a prefix of x's shape, e.g. (N,) for x (N, D)) trailing singleton dims."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return t.reshape(*t.shape, *([1] * (x.dim() - t.dim())))


# ----------------------------------------------------------------------------------------
# The path
# ----------------------------------------------------------------------------------------


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    r""":math:`x_t = (1 - t) x_0 + t \epsilon`. x0, noise: (N, ...); t: scalar or (N,)."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    r""":math:`v = \epsilon - x_0`, the time derivative of the straight path."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    r""":math:`x_0 = x_t - t v` (follow the line from t back to 0)."""
    return x_t - _expand(t, x_t) * v


def noise_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    r""":math:`\epsilon = x_t + (1 - t) v` (follow the line from t forward to 1)."""
    return x_t + (1 - _expand(t, x_t)) * v


# ----------------------------------------------------------------------------------------
# Timesteps
# ----------------------------------------------------------------------------------------


def sample_logit_normal(
    n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""n timesteps :math:`t = \sigma(u),\ u \sim N(\text{mean}, \text{std}^2)`, in (0, 1).

    SD3's best setting is mean 0, std 1: it puts more samples at mid t, where the velocity
    is hardest to predict. Returns (n,) float32 on the CPU (move it yourself)."""
    u = torch.randn(n, generator=generator) * std + mean
    return torch.sigmoid(u)


def shift_timesteps(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    r"""SD3's timestep shift :math:`t' = \frac{s t}{1 + (s - 1) t}`.

    Monotone, fixes 0 and 1, and for s > 1 moves every t towards noise. It is the t at
    which a signal with s^2 times fewer independent values has the same signal-to-noise
    ratio (SD3, Eq. 23)."""
    assert bool((torch.as_tensor(shift) > 0).all()), f"shift must be positive, got {shift}"
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(
    num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0, min_shift: float = 1.0, max_shift: float = 8.0
) -> float:
    r"""Shift for a video of ``num_tokens`` tokens: :math:`s = s_0 \sqrt{N / N_0}` (SD3 Sec. 5.3.2,
    where :math:`\alpha = \sqrt{m/n}` for m and n pixels), clamped to [min_shift, max_shift].

    Counting tokens (t * h * w) makes the shift grow with both resolution and duration:
    neighbouring frames are as redundant as neighbouring pixels. ``base_tokens`` is the size
    the unshifted schedule was tuned at."""
    assert num_tokens > 0 and base_tokens > 0, "token counts must be positive"
    s = base_shift * math.sqrt(num_tokens / base_tokens)
    return float(min(max(s, min_shift), max_shift))


def time_grid(num_steps: int, shift: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sampling times from 1 (noise) to 0 (data): (num_steps + 1,), uniform then shifted.
    With shift > 1 the steps are denser near t = 1, where coarse structure is decided."""
    assert num_steps >= 1, "need at least one step"
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_timesteps(t, shift).to(dtype)


# ----------------------------------------------------------------------------------------
# Conditioning frames and text dropout
# ----------------------------------------------------------------------------------------


def frames_mask(grid: tuple[int, int, int], frames) -> torch.Tensor:
    """bool (N,) over the t-major tokens of ``grid`` = (t, h, w): True on latent frames in
    ``frames`` (ints; negative counts from the end). The general form behind every mode."""
    T, H, W = grid
    chosen = torch.zeros(T, dtype=torch.bool)
    for f in frames:
        assert -T <= f < T, f"frame {f} outside a latent video of {T} frames"
        chosen[f] = True
    return chosen.repeat_interleave(H * W)  # (N,)


def conditioning_mask(
    grid: tuple[int, int, int], mode: str, k: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """bool (N,) marking the tokens of whole latent frames given clean to the model.

    mode: "none"; "first" (image-to-video); "first_k" (extend forward); "last_k" (extend
    backward); "first_last" (first and last frame: interpolation / loops). ``k`` frames
    for the *_k modes; None draws k uniformly in [1, T - 1] with ``generator``. At least
    one frame always stays noisy (k is capped at T - 1), and a one-frame video (an image)
    gets no conditioning at all: otherwise it would have nothing left to learn.
    """
    assert mode in CONDITIONING_MODES, f"unknown conditioning mode {mode!r}; known: {CONDITIONING_MODES}"
    T = grid[0]
    if mode == "none" or T < 2:
        return frames_mask(grid, [])
    if mode == "first":
        return frames_mask(grid, [0])
    if mode == "first_last":
        return frames_mask(grid, [0, T - 1]) if T >= 3 else frames_mask(grid, [0])
    if k is None:
        k = int(torch.randint(1, T, (1,), generator=generator))
    k = max(1, min(k, T - 1))
    return frames_mask(grid, range(k) if mode == "first_k" else range(T - k, T))


def sample_conditioning_mode(generator: torch.Generator | None, probs: dict[str, float]) -> str:
    """Draw a mode name with the given (unnormalised) probabilities, e.g.
    ``{"none": 0.7, "first": 0.15, "first_k": 0.05, "last_k": 0.05, "first_last": 0.05}``."""
    names = list(probs)
    assert all(n in CONDITIONING_MODES for n in names), f"unknown modes in {names}"
    weights = torch.tensor([probs[n] for n in names], dtype=torch.float64)
    assert weights.sum() > 0 and (weights >= 0).all(), f"bad probabilities {probs}"
    return names[int(torch.multinomial(weights, 1, generator=generator))]


def drop_text(mask_or_flags: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free-guidance dropout (Ho & Salimans 2022): with probability p per video,
    remove its prompt. Input (B, L) bool text mask -> mask with dropped rows all False (the
    DiT then sees only its null text key); or (B,) bool keep-flags -> flags with drops False."""
    keep = torch.rand(mask_or_flags.shape[0], generator=generator) >= p  # (B,)
    keep = keep.to(mask_or_flags.device)
    return mask_or_flags & (keep[:, None] if mask_or_flags.dim() == 2 else keep)


# ----------------------------------------------------------------------------------------
# The training loss
# ----------------------------------------------------------------------------------------


@dataclass
class FlowConfig:
    """How training draws timesteps, conditioning frames and text dropout."""

    t_mean: float = 0.0  # logit-normal location (SD3: 0)
    t_std: float = 1.0  # logit-normal scale (SD3: 1)
    shift: float = 1.0  # timestep shift: fixed when base_tokens is None, else the shift at base_tokens
    # tokens per video where the shift is `shift`; each video then gets resolution_shift(its tokens, ...)
    base_tokens: int | None = None
    # probability of each conditioning mode (CONDITIONING_MODES) per training video
    cond_mode_probs: dict[str, float] = field(default_factory=lambda: {"none": 1.0})
    cond_k: int | None = None  # frames for the *_k modes; None = random in [1, T-1]
    p_uncond: float = 0.1  # CFG text dropout probability


def flow_matching_loss(model, batch, cfg: FlowConfig, generator: torch.Generator | None = None, text=None, text_mask=None):
    """Rectified-flow MSE on a :class:`~sora.packing.PackedBatch` or ``PaddedBatch``.

    Per video: t ~ shifted logit-normal; a conditioning mode picks clean frames (t = 0, kept
    clean in x_t, no loss); its prompt is dropped with probability p_uncond. Loss = mean of
    ||v_theta - (eps - x0)||^2 / D_in over the tokens that are neither conditioning nor
    padding. ``text``/``text_mask``
    (B, L, text_dim)/(B, L) override the batch's own text (for batches that carry a
    ``text_index``). All randomness comes from ``generator`` (CPU).
    Returns (loss, stats) with stats a dict of floats.
    """
    from sora.packing import PaddedBatch  # local: packing is data plumbing, flow is math

    text = batch.text if text is None else text
    text_mask = batch.text_mask if text_mask is None else text_mask
    assert text is not None and text_mask is not None, "no text: pass text/text_mask or batch with text states"
    device = batch.tokens.device
    B = len(batch.grids)

    if isinstance(batch, PaddedBatch):
        Nmax = batch.tokens.shape[1]
        x0 = batch.tokens.reshape(B * Nmax, -1)  # (N, D_in)
        positions = batch.positions.reshape(B * Nmax, 3)  # (N, 3)
        seq_ids = torch.arange(B, device=device).repeat_interleave(Nmax)  # (N,)
        valid = batch.token_mask.reshape(-1)  # (N,)
    else:
        x0, positions, seq_ids, valid = batch.tokens, batch.positions, batch.seq_ids, None

    # per-video timesteps, shifted per video when the shift depends on size
    t_video = sample_logit_normal(B, cfg.t_mean, cfg.t_std, generator)  # (B,)
    shifts = [
        cfg.shift if cfg.base_tokens is None else resolution_shift(math.prod(g), cfg.base_tokens, cfg.shift)
        for g in batch.grids
    ]
    t_video = shift_timesteps(t_video, torch.tensor(shifts))  # (B,)

    # conditioning frames, per video, laid out like the tokens
    cond_parts = []
    for g in batch.grids:
        mode = sample_conditioning_mode(generator, cfg.cond_mode_probs)
        m = conditioning_mask(g, mode, cfg.cond_k, generator)  # (N_i,)
        if valid is not None:
            m = torch.cat([m, torch.zeros(Nmax - m.numel(), dtype=torch.bool)])  # pad to (Nmax,)
        cond_parts.append(m)
    cond = torch.cat(cond_parts).to(device)  # (N,)

    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=x0.dtype)  # (N, D_in)
    t_tok = torch.where(cond, 0.0, t_video.to(device)[seq_ids])  # (N,) clean frames at t = 0
    x_t = interpolate(x0, noise, t_tok)  # (N, D_in); at t = 0 this is exactly x0
    target = velocity_target(x0, noise)  # (N, D_in)
    text_mask = drop_text(text_mask, cfg.p_uncond, generator)  # (B, L)

    pred = model(x_t, positions, t_tok.to(x0.dtype), seq_ids, text, text_mask, valid=valid)  # (N, D_in)
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (N,)
    weight = ~cond if valid is None else (~cond & valid)  # (N,)
    n_loss = weight.sum()
    assert n_loss > 0, "every token is conditioning or padding: nothing to learn from"
    w = weight.float()  # (N,) 1 on the loss tokens
    loss = (per_token * w).sum() / w.sum()
    stats = {
        "loss": loss.item(),
        "loss_tokens": int(n_loss),
        "t_mean": t_video.mean().item(),
        "cond_fraction": cond.float().sum().item() / (x0.shape[0] if valid is None else valid.sum().item()),
        "uncond_fraction": (~text_mask.any(dim=1)).float().mean().item(),
    }
    return loss, stats
