"""Training pieces for the video VAE: loss, PSNR, one optimisation step, the weights Muon trains.

Pure torch, no distributed code: a Ray Train (or any) loop wraps `train_step`.

The loss (per batch, all terms are means so the weights do not depend on clip size):
    recon  = mean w * (x_hat - x)^2 / mean w  (L2; or absolute error with recon="l1"), w = 1 on the
                                             background, 1 + fg_weight on object pixels (below)
    grad   = mean |d(x_hat) - d(x)|           finite differences along H, W and T: sharp
                                             edges are what flat-coloured shapes are made of
    kl     = mean KL(q(z|x) || N(0, I))       per latent element
    loss   = recon + grad_weight * grad + kl_weight * kl

kl_weight is small (1e-6 by default, per element): enough to keep the latent
bounded and smooth for diffusion, small enough not to cost reconstruction
quality (the usual choice for latent-diffusion VAEs, Rombach et al. 2022).

Which recipe (crops, image steps, object-pixel weight, Muon) trains fastest on a CPU is a
measured choice: `python -m benchmarks.vae_recipes` compares recipes side by side, and
docs/experiments.md records the results. `pipelines.train_vae` holds the defaults.

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
    # extra reconstruction weight of object pixels (`foreground_mask`): they weigh 1 + this; 0 disables it
    fg_weight: float = 0.0
    fg_threshold: float = 0.3  # summed |RGB| distance from the frame's median ([-1, 1] units) of an object pixel

    def __post_init__(self) -> None:
        if self.recon not in ("l1", "l2"):
            raise ValueError(f"recon must be 'l1' or 'l2', got {self.recon!r}")
        if self.fg_weight < 0 or self.grad_weight < 0 or self.kl_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got fg_weight={self.fg_weight}, "
                             f"grad_weight={self.grad_weight}, kl_weight={self.kl_weight}")


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


def foreground_mask(x: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """(B, 1, T, H, W) float 0/1: pixels of x (B, C, T, H, W) whose summed |difference| from their
    frame's per-channel median (the background, when objects cover under half the frame) exceeds
    `threshold`."""
    background = x.flatten(3).median(dim=3).values[..., None, None]  # (B, C, T, 1, 1)
    return ((x - background).abs().sum(dim=1, keepdim=True) > threshold).to(x.dtype)


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
        err = (x_hat - x).abs()
    elif cfg.recon == "l2":
        err = (x_hat - x).pow(2)
    else:
        raise ValueError(f"recon must be 'l1' or 'l2', got {cfg.recon!r}")
    if cfg.fg_weight > 0:
        w = 1.0 + cfg.fg_weight * foreground_mask(x, cfg.fg_threshold)  # (B, 1, T, H, W)
        recon = (w * err).mean() / w.mean()
    else:
        recon = err.mean()
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


def muon_kernel_names(vae: CausalVideoVAE) -> list[str]:
    """The VAE weights `sora.optim.Muon` updates: every conv kernel except the encoder's first
    and the decoder's last (pixels in and out; Muon is for hidden layers). Biases stay with AdamW."""
    edges = {"encoder.conv_in.conv.weight", "decoder.conv_out.conv.weight"}
    return [n for n, p in vae.named_parameters() if p.dim() >= 2 and n not in edges]


@torch.no_grad()
def evaluate_psnr(vae: CausalVideoVAE, clips, **codec_kwargs) -> float:
    """Mean PSNR (dB) of encode(mode) -> decode over an iterable of (B, 3, T, H, W) clips."""
    vae.eval()
    scores = []
    for x in clips:
        x_hat = vae.decode(vae.encode(x, **codec_kwargs).mode(), **codec_kwargs)
        scores.append(psnr(x_hat, x))
    return float(torch.cat(scores).mean())
