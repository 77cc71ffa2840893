"""Training pieces for the video VAE: loss, PSNR, one optimisation step.

Pure torch, no distributed code: a Ray Train (or any) loop wraps `train_step`.

The loss (per batch, all terms are means so the weights do not depend on clip size):
    recon  = mean (x_hat - x)^2               (L2; or absolute error with recon="l1")
    grad   = mean |d(x_hat) - d(x)|           finite differences along H, W and T: sharp
                                             edges are what flat-coloured shapes are made of
    kl     = mean KL(q(z|x) || N(0, I))       per latent element
    loss   = recon + grad_weight * grad + kl_weight * kl

kl_weight is small (1e-6 by default, per element): enough to keep the latent
bounded and smooth for diffusion, small enough not to cost reconstruction
quality (the usual choice for latent-diffusion VAEs, Rombach et al. 2022).

What we measured (2026-11-24, one thread each, two runs side by side on an idle 2-core box,
4 minutes = ~500 steps of 4 crops of 64x64x9 from 240 default-range shapes-world clips;
held-out PSNR over 16 whole clips; `python -m benchmarks.vae_recipes`):
    plain VAE, GroupNorm, L1, lr 2e-3, random crops (old)        17.2 dB on its training crops at step 400
    plain VAE, no norm, L2, lr 1e-3, random crops                18.1 dB on its training crops at step 400
    plain VAE, no norm, L2, lr 1e-3, content-aware crops         18.2 dB
    + block-mean shortcut (VAEConfig.shortcut)                   22.2 dB   (GroupNorm: 21.9)
    + shortcut, 16 latent channels instead of 8                  22.2 dB
    + shortcut, lr 2e-3 with 50 warm-up steps                    15.3 dB   (unstable)
    the block-mean codec alone, no learning                      22.0 dB
    (the next four ran beside a third single-thread job, so with less CPU than the above)
    + shortcut, 32x32 crops (1260 steps in the same 4 minutes)   24.6 dB
    + shortcut, 32x32 crops of 5 frames (1500 steps)             24.4 dB
    + shortcut, 16x16 crops (1300 steps)                         17.1 dB   (latent 2x2: all border)
    + shortcut, 32x32 crops, batch 16 (370 steps)                22.7 dB
So the shortcut buys ~4 dB at once; past it, the number of steps is what counts (edge
detail takes long), so small crops and small batches win. Adam above 1e-3 diverges on these
flat-coloured frames. `pipelines.train_vae` defaults follow this table (crop 32, lr 1e-3).

Tiny CPU run (see `VAEConfig.preset("tiny")`):
    vae = CausalVideoVAE(VAEConfig.preset("tiny"))
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for x in clips:                          # (B, 3, 17, 64, 112) in [-1, 1]
        metrics = train_step(vae, opt, x, VAELossConfig())
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sora.vae import CausalVideoVAE


@dataclass
class VAELossConfig:
    recon: str = "l2"  # "l2" (what PSNR measures) or "l1"
    grad_weight: float = 0.5  # weight of the finite-difference (edge) loss; 0 disables it
    kl_weight: float = 1e-6  # per-element KL weight
    sample_posterior: bool = True  # train through z ~ q(z|x) (the VAE); False = plain autoencoder
    max_grad_norm: float | None = 1.0  # gradient clipping; None disables it


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per batch item.

    Args:
        x, y: (B, ...) tensors; values in [-1, 1] by default (data_range=2.0), which gives the
            same number as PSNR on [0, 1] images. Inputs are clamped to the range first.
    Returns:
        (B,) PSNR in dB; identical inputs give +inf.
    """
    assert x.shape == y.shape, f"psnr shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}"
    lo, hi = (-1.0, 1.0) if data_range == 2.0 else (0.0, data_range)
    x = x.detach().float().clamp(lo, hi)
    y = y.detach().float().clamp(lo, hi)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


def gradient_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean L1 between finite differences of (B, C, T, H, W) videos along T, H and W."""
    loss = x.new_zeros(())
    for dim in (2, 3, 4):
        if x.shape[dim] > 1:
            loss = loss + (torch.diff(x_hat, dim=dim) - torch.diff(x, dim=dim)).abs().mean()
    return loss


def vae_loss(
    vae: CausalVideoVAE, x: torch.Tensor, cfg: VAELossConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch x (B, 3, T, H, W) in [-1, 1]; returns (loss, metrics)."""
    x_hat, posterior = vae(x, sample=cfg.sample_posterior, generator=generator)  # (B, 3, T, H, W)
    if cfg.recon == "l1":
        recon = (x_hat - x).abs().mean()
    elif cfg.recon == "l2":
        recon = (x_hat - x).pow(2).mean()
    else:
        raise ValueError(f"recon must be 'l1' or 'l2', got {cfg.recon!r}")
    kl = posterior.kl().mean()
    grad = gradient_loss(x_hat, x) if cfg.grad_weight > 0 else x.new_zeros(())
    loss = recon + cfg.grad_weight * grad + cfg.kl_weight * kl
    metrics = {
        "loss": float(loss.detach()),
        "recon": float(recon.detach()),
        "grad": float(grad.detach()),
        "kl": float(kl.detach()),
        "psnr": float(psnr(x_hat, x).mean()),
    }
    return loss, metrics


def train_step(
    vae: CausalVideoVAE,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    cfg: VAELossConfig | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One optimisation step on x (B, 3, T, H, W); returns the metrics of `vae_loss`."""
    cfg = cfg or VAELossConfig()
    vae.train()
    optimizer.zero_grad(set_to_none=True)
    loss, metrics = vae_loss(vae, x, cfg, generator)
    loss.backward()
    if cfg.max_grad_norm is not None:
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.max_grad_norm))
    optimizer.step()
    return metrics


@torch.no_grad()
def evaluate_psnr(vae: CausalVideoVAE, clips, **codec_kwargs) -> float:
    """Mean PSNR (dB) of encode(mode) -> decode over an iterable of (B, 3, T, H, W) clips."""
    vae.eval()
    scores = []
    for x in clips:
        x_hat = vae.decode(vae.encode(x, **codec_kwargs).mode(), **codec_kwargs)
        scores.append(psnr(x_hat, x))
    return float(torch.cat(scores).mean())
