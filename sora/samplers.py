r"""Samplers for rectified flow: pure functions over a time grid (two ODE steppers and one
stochastic, ancestral one).

Sampling integrates :math:`dx/dt = v_\theta(x, t)` from the first time of the grid
(1 = pure noise, or lower for SDEdit-style editing) down to 0 (see :mod:`sora.flow`).
No hidden step counters: the caller builds the grid with :func:`sora.flow.time_grid` and
the samplers walk it.

A velocity function maps tokens x (N, D_in) and per-token times t (N,) to v (N, D_in).
:func:`guided_velocity` builds one from the DiT with classifier-free guidance (cond and
uncond in a single packed forward). Known tokens (clean conditioning frames) are held at
their clean value with t = 0 throughout, exactly as in training.
"""

from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (N, D), t (N,)) -> (N, D)
NoiseFn = Callable[[], torch.Tensor]  # () -> fresh standard normal noise of the state's shape (N, D)


def _hold_known(x, known, known_mask):
    """x: (N, D); known: (N, D) or None; known_mask: (N,) bool or None -> x with known rows clean."""
    if known_mask is None:
        return x
    assert known is not None and known.shape == x.shape, "known_mask needs known values of x's shape"
    return torch.where(known_mask[:, None], known, x)


def _token_times(t: torch.Tensor, x: torch.Tensor, known_mask) -> torch.Tensor:
    """Scalar grid time -> (N,) per-token times, 0 on known tokens."""
    t_tok = t.to(x.dtype).expand(x.shape[0]).clone()  # (N,)
    if known_mask is not None:
        t_tok[known_mask] = 0.0
    return t_tok


@torch.no_grad()
def euler(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""First-order integration :math:`x \leftarrow x + (t_{i+1} - t_i)\, v(x, t_i)`.

    x: (N, D_in) state at ``timesteps[0]`` (noise for t = 1); timesteps: (S + 1,)
    decreasing; known/known_mask: (N, D_in)/(N,) clean tokens held fixed at t = 0.
    Returns x at ``timesteps[-1]`` (N, D_in). S model calls."""
    x = _hold_known(x, known, known_mask)
    for i in range(len(timesteps) - 1):
        t, t_next = timesteps[i], timesteps[i + 1]
        v = velocity_fn(x, _token_times(t, x, known_mask))  # (N, D_in)
        x = _hold_known(x + (t_next - t).to(x.dtype) * v, known, known_mask)  # (N, D_in)
    return x


@torch.no_grad()
def heun(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Second-order Heun (trapezoid) steps, as in EDM (Karras et al. 2022, Alg. 1):
    predict :math:`\tilde x = x + h v(x, t_i)`, correct
    :math:`x \leftarrow x + \tfrac{h}{2}(v(x, t_i) + v(\tilde x, t_{i+1}))`.

    The step that lands on t = 0 stays Euler (also as EDM): the model is barely trained at
    t = 0 for noisy tokens, so a correction there buys nothing. 2S - 1 model calls when the
    grid ends at 0. Same arguments as :func:`euler`."""
    x = _hold_known(x, known, known_mask)
    for i in range(len(timesteps) - 1):
        t, t_next = timesteps[i], timesteps[i + 1]
        h = (t_next - t).to(x.dtype)
        v = velocity_fn(x, _token_times(t, x, known_mask))  # (N, D_in)
        x_pred = _hold_known(x + h * v, known, known_mask)  # (N, D_in)
        if float(t_next) == 0.0:
            x = x_pred
            continue
        v_next = velocity_fn(x_pred, _token_times(t_next, x, known_mask))  # (N, D_in)
        x = _hold_known(x + 0.5 * h * (v + v_next), known, known_mask)  # (N, D_in)
    return x


@torch.no_grad()
def ancestral(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    noise_fn: NoiseFn | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    r"""Stochastic steps (DDIM with :math:`\eta`, Song et al. 2021) on the flow's Gaussian path
    :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon` with :math:`\alpha_t = 1 - t,\ \sigma_t = t`.

    From the model's estimates :math:`\hat x_0 = x - t v` and :math:`\hat\epsilon = x + (1 - t) v`,
    a step from t to s < t lands on :math:`\alpha_s \hat x_0 + \sqrt{\sigma_s^2 - c^2}\,\hat\epsilon
    + c z`, z fresh noise, :math:`c = \eta \cdot` the std of the posterior
    :math:`q(x_s \mid x_t, x_0)`. eta = 1 is the ancestral (DDPM-like) sampler: each step
    replaces part of the noise it came from with fresh noise; eta = 0 is exactly :func:`euler`.
    With few steps it draws a narrower distribution than the data's (more so than Euler; see
    docs/experiments.md, Sampling and guidance). The step that lands on t = 0 returns
    :math:`\hat x_0`. ``noise_fn`` gives z (default: ``torch.randn`` from the global RNG; pass
    one per video seeded generators for reproducible videos). S model calls."""
    assert 0.0 <= eta <= 1.0, f"eta must be in [0, 1], got {eta}"
    x = _hold_known(x, known, known_mask)
    for i in range(len(timesteps) - 1):
        t, s = float(timesteps[i]), float(timesteps[i + 1])
        v = velocity_fn(x, _token_times(timesteps[i], x, known_mask))  # (N, D_in)
        x0, eps = x - t * v, x + (1.0 - t) * v
        if s <= 0.0:
            x = x0
        else:
            a_ts = (1.0 - t) / (1.0 - s)  # alpha_t / alpha_s
            c = eta * s * max(t * t - a_ts * a_ts * s * s, 0.0) ** 0.5 / t  # posterior std x eta
            z = noise_fn() if noise_fn is not None else torch.randn_like(x)
            x = (1.0 - s) * x0 + max(s * s - c * c, 0.0) ** 0.5 * eps + c * z.to(x.dtype)
        x = _hold_known(x, known, known_mask)
    return x


def guided_velocity(
    model,
    positions: torch.Tensor,
    seq_ids: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    guidance_scale: float = 1.0,
) -> VelocityFn:
    r"""The DiT as a velocity function with classifier-free guidance (Ho & Salimans 2022):
    :math:`v = v_u + s\,(v_c - v_u)`.

    The unconditional branch is the same pack again with every prompt removed (all-False
    text mask) and video ids shifted by B, so both branches run in one forward of 2N tokens.
    guidance_scale 1 runs the conditional branch alone. positions (N, 3), seq_ids (N,),
    text (B, L, text_dim), text_mask (B, L)."""
    B = text.shape[0]
    if guidance_scale == 1.0:
        return lambda x, t: model(x, positions, t, seq_ids, text, text_mask)

    positions2 = torch.cat([positions, positions])  # (2N, 3)
    seq_ids2 = torch.cat([seq_ids, seq_ids + B])  # (2N,)
    text2 = torch.cat([text, text])  # (2B, L, text_dim)
    text_mask2 = torch.cat([text_mask, torch.zeros_like(text_mask)])  # (2B, L)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), positions2, torch.cat([t, t]), seq_ids2, text2, text_mask2)  # (2N, D_in)
        v_cond, v_uncond = out.chunk(2)  # 2 x (N, D_in)
        return v_uncond + guidance_scale * (v_cond - v_uncond)  # (N, D_in)

    return velocity


def initial_noise(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None, dtype=torch.float32):
    """Gaussian starting state, drawn on the CPU so a seed gives the same video on any device."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
