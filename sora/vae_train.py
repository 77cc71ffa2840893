"""Training pieces for the video VAE: loss, PSNR, one optimisation step, Muon for conv kernels.

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
flat-coloured frames.

PSNR is not what the diffusion model needs from a VAE, though: shape is. Measured 2026-12-01
(one thread, 7 minutes, the shortcut VAE with 8 latent channels, 432 training clips of a default
demo; "ceiling" = shape accuracy of the shapes-world evaluator on the VAE round trip of the 100
held-out eval references, i.e. the best any DiT on these latents could score):
    AdamW lr 1e-3, 25% image steps (the old recipe)             2,155 steps   ceiling 0.54
    KernelMuon lr 1e-3 / 2e-3 / 3e-3 / 5e-3 (AdamW on the rest)  ~1,700       0.73 / 0.73 / 0.54 / diverged
    Muon 1.5e-3 + object pixels weighted 9x (fg_weight 8)        1,750        0.79
    Muon 1.5e-3 + 60% image steps                                2,439        0.76
    Muon 1.5e-3 + fg_weight 8 + 60% image steps                  2,458        0.84  (fg_weight 24: 0.81)
Small triangles were the loss: with the old recipe the round trip draws them as rounded blobs
that the evaluator reads as circles or squares. `pipelines.train_vae` defaults follow both
tables (crop 32, AdamW lr 1e-3, KernelMuon lr 1.5e-3, fg_weight 8, image_prob 0.6).

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
    # Object pixels (farther than fg_threshold, summed |RGB| in [-1, 1] units, from their frame's
    # per-channel median) weigh 1 + fg_weight in the reconstruction term. Small objects are a few
    # percent of a crop's pixels, so a plain mean lets the easy background outvote them: with
    # fg_weight 0 the round trip of small triangles reads as circles (shapes-world evaluator,
    # 3 of 20), with 8 it keeps more of them (docs/experiments.md, VAE). 0 disables it.
    # On natural video most pixels differ from the median by more than the threshold, so the
    # weights (normalised by their mean) fade towards uniform there: harmless, not a gain.
    fg_weight: float = 0.0
    fg_threshold: float = 0.3


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


# ----------------------------------------------------------------------------- optimizer


def orthogonalize(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately the nearest semi-orthogonal matrix to G (m, n): U V^T of its SVD.

    Muon's quintic Newton-Schulz iteration (K. Jordan et al., "Muon", 2024): after scaling G to
    unit Frobenius norm, X <- a X + (b A + c A^2) X with A = X X^T pushes every singular value
    towards 1; the coefficients (3.4445, -4.7750, 2.0315) are tuned to land them in ~[0.7, 1.2]
    in five steps, which is all Muon needs. Works on the short side (A is min(m, n) square).
    """
    assert G.dim() == 2, f"orthogonalize needs a matrix, got shape {tuple(G.shape)}"
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = G.shape[0] > G.shape[1]
    X = G.float() / (G.norm() + eps)
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T  # (m, m), m = the short side
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


def orthogonalize_across_ranks(updates: list[torch.Tensor], orthogonalize_fn=orthogonalize) -> list[torch.Tensor]:
    """``[orthogonalize_fn(u) for u in updates]``, each computed on ONE data-parallel rank.

    For optimizers of replicated models (DDP): every rank holds the same reduced gradients, so
    every rank would run the same Newton-Schulz iterations; instead each matrix goes to one rank
    (largest first, to the least loaded; the same plan everywhere), and one all-reduce of a flat
    fp32 buffer, zero where a rank did not compute, gives every rank all results. The values are
    exactly those of the unsplit loop (a sum with zeros is exact). Without an initialised
    process group of 2+ ranks it is the plain loop. The callers must only use it when the
    updates really are identical on every rank.
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


class KernelMuon(torch.optim.Optimizer):
    """Muon for convolution kernels: each (C_out, C_in, *k) weight's momentum is orthogonalised
    as a (C_out, C_in * prod(k)) matrix, the view a convolution actually multiplies by.

    torch.optim.Muon refuses anything but 2-D parameters, and the VAE is all 3-D convolutions.
    Update (per parameter, like torch.optim.Muon with nesterov and adjust_lr_fn="match_rms_adamw"):
        buf <- momentum * buf + (1 - momentum) * g;  u = (1 - momentum) * g + momentum * buf
        p   <- p * (1 - lr * weight_decay) - lr * 0.2 * sqrt(max(m, n)) * orthogonalize(u)
    The 0.2 * sqrt(max(m, n)) factor gives the update AdamW's typical RMS (Liu et al., "Muon is
    scalable for LLM training", 2025), so `lr` means what it means for AdamW. Biases, and the
    first and last layers, belong with AdamW (see `muon_kernel_names`).

    Measured on the shapes world (VAE tiny, 1 thread, 7 min; the table at the top): at equal steps
    ~3 dB ahead of AdamW (23.0 vs 20.1 dB at step 1,000), in equal time 26.6 dB against 22.9 dB.
    """

    def __init__(self, params, lr: float = 2e-3, momentum: float = 0.95, weight_decay: float = 0.0, ns_steps: int = 5,
                 across_ranks: bool = False):
        """across_ranks: the model is replicated over a data-parallel group (DDP), so each
        kernel's Newton-Schulz runs on one rank only (`orthogonalize_across_ranks`)."""
        assert lr > 0 and 0 <= momentum < 1, f"KernelMuon: need lr > 0 and 0 <= momentum < 1, got {lr}, {momentum}"
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        self.across_ranks = across_ranks
        for group in self.param_groups:
            for p in group["params"]:
                assert p.dim() >= 2, f"KernelMuon updates matrices and kernels, got a {p.dim()}-D parameter {tuple(p.shape)}"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            params, updates = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                params.append(p)
                updates.append(p.grad.lerp(buf, mu).reshape(p.shape[0], -1))  # nesterov, as a (C_out, fan_in) matrix
            ortho = lambda u: orthogonalize(u, group["ns_steps"])  # noqa: E731
            results = (orthogonalize_across_ranks(updates, ortho) if self.across_ranks
                       else [ortho(u) for u in updates])
            for p, u, o in zip(params, updates, results):
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(o.view_as(p), alpha=-lr * 0.2 * max(u.shape) ** 0.5)
        return loss


def muon_kernel_names(vae: CausalVideoVAE) -> list[str]:
    """The VAE weights KernelMuon updates: every conv kernel except the encoder's first and the
    decoder's last (pixels in and out; Muon is for hidden layers). Biases stay with AdamW."""
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
