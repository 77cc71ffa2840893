"""Side-by-side VAE training recipes on the shapes world: which settings learn fastest on a CPU.

Not a pass/fail benchmark: a small harness for the VAE recipe comparisons in docs/experiments.md.
One process, one thread, a fixed wall-clock budget; run two at once on a 2-core box to compare
two recipes under the same conditions. Each run prints one JSON line (and appends it to
--results): steps done, held-out PSNR over 16 whole clips (cropped to multiples of 8), and the
shape ceiling: the shapes-world evaluator's accuracy on the VAE round trip of the 100 held-out
eval references at 64p (what a DiT on these latents could at best score).

    python -m benchmarks.vae_recipes --name adamw --optimizer adamw --fg-weight 0 --image-prob 0.25 &
    python -m benchmarks.vae_recipes --name recipe &        # the defaults: pipelines.train_vae's

(The first recipe table predates --optimizer/--fg-weight: it ran AdamW, weight 0.)

Clips are rendered (not encoded to video) from sora.shapes with the default ranges: 240 for
training (seed 11), 16 held out (seed 12), cached in --cache.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch


def load_clips(cache: str, n_train: int = 240, n_test: int = 16) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from sora.shapes import render, sample_clip

    if not os.path.exists(cache):
        arrays = [render(sample_clip(11, i)) for i in range(n_train)] + [render(sample_clip(12, i)) for i in range(n_test)]
        np.savez(cache, *arrays)
    z = np.load(cache)
    arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
    return arrays[:n_train], arrays[n_train:]


@torch.no_grad()
def shape_ceiling(vae, n_prompts: int) -> dict:
    """Evaluator accuracy (colour, shape, size, motion) on the VAE round trip of the reference
    clips of `n_prompts` held-out eval prompts at 64p, and shape by size (small / large)."""
    from collections import Counter

    from sora.evaluator import score
    from sora.shapes import ClipSpec, make_eval_prompts, render

    if n_prompts <= 0:
        return {}
    ok, by_size, n_size = Counter(), Counter(), Counter()
    prompts = make_eval_prompts(n_prompts, 0, resolution="64p")
    for p in prompts:
        frames = render(ClipSpec.from_attributes(p["reference"]))
        frames = frames[: 1 + 4 * ((len(frames) - 1) // 4)]  # 4k+1 frames
        x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        y = vae.decode_latents(vae.encode_latents(x))[0]
        out = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
        s = score(out, {k: p[k] for k in ("color", "shape", "size", "motion", "background")})
        for k in ("color", "shape", "size", "motion"):
            ok[k] += s[f"{k}_ok"]
        by_size[p["size"]] += s["shape_ok"]
        n_size[p["size"]] += 1
    return {"ceiling": {k: ok[k] / len(prompts) for k in ("color", "shape", "size", "motion")},
            "ceiling_shape_by_size": {k: round(by_size[k] / n_size[k], 3) for k in sorted(n_size)}}


def main() -> None:
    from sora.vae import CausalVideoVAE, VAEConfig
    from pipelines.train_vae import VAETrainConfig, make_vae_optimizer
    from sora.optim import LRSchedule, lr_at
    from sora.vae_train import VAELossConfig, psnr, vae_loss

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    ap.add_argument("--norm", default="none", choices=("none", "group"))
    ap.add_argument("--shortcut", type=int, default=1, help="block-mean shortcut (VAEConfig.shortcut)")
    ap.add_argument("--latent", type=int, default=8, help="latent channels")
    ap.add_argument("--recon", default="l2", choices=("l1", "l2"))
    ap.add_argument("--grad", type=float, default=0.5, help="edge (finite difference) loss weight")
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--image-prob", type=float, default=0.6)
    ap.add_argument("--optimizer", default="muon", choices=("muon", "adamw"), help="see VAETrainConfig.optimizer")
    ap.add_argument("--muon-lr", type=float, default=1.5e-3)
    ap.add_argument("--fg-weight", type=float, default=8.0, help="extra loss weight of object pixels")
    ap.add_argument("--ceiling-prompts", type=int, default=100, help="eval references for the shape ceiling (0: skip)")
    ap.add_argument("--candidates", type=int, default=4, help="content-aware crops: keep the most varied of N")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vae_recipes_clips.npz"))
    ap.add_argument("--results", default="vae_recipes.jsonl")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train, test = load_clips(a.cache)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = VAEConfig(**{**asdict(VAEConfig.preset("tiny")), "norm": a.norm, "norm_groups": 8,
                       "shortcut": bool(a.shortcut), "latent_channels": a.latent})
    vae = CausalVideoVAE(cfg)
    opt = make_vae_optimizer(vae, VAETrainConfig(optimizer=a.optimizer, lr=a.lr, muon_lr=a.muon_lr))
    loss_cfg = VAELossConfig(recon=a.recon, grad_weight=a.grad, fg_weight=a.fg_weight)

    def batch() -> torch.Tensor:
        t = 1 if rng.random() < a.image_prob else a.frames
        out = []
        for _ in range(a.bs):
            best, best_var = None, -1.0
            for _ in range(max(1, a.candidates)):
                c = train[rng.integers(len(train))]
                t0, y0, x0 = (rng.integers(c.shape[0] - t + 1), rng.integers(c.shape[1] - a.crop + 1),
                              rng.integers(c.shape[2] - a.crop + 1))
                w = c[t0 : t0 + t, y0 : y0 + a.crop, x0 : x0 + a.crop]
                v = float(w.reshape(-1, 3).std(axis=0).sum())
                if v > best_var:
                    best, best_var = w, v
            out.append(best)
        return torch.from_numpy(np.stack(out)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (B, 3, T, h, w)

    schedule = LRSchedule(lr=a.lr, warmup_steps=a.warmup, decay="cosine", min_lr_ratio=0.05)  # over the time budget
    t_start, step, budget = time.monotonic(), 0, a.minutes * 60
    while time.monotonic() - t_start < budget:
        opt.set_lr(lr_at(step + 1, schedule, (time.monotonic() - t_start) / budget))
        vae.train()
        opt.zero_grad(set_to_none=True)
        loss, metrics = vae_loss(vae, batch(), loss_cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0:
            print(f"{a.name} step {step} train-crop PSNR {metrics['psnr']:.2f} dB", flush=True)
    vae.eval()
    scores = []
    with torch.no_grad():
        for f in test:
            f = np.ascontiguousarray(f[:, : f.shape[1] // 8 * 8, : f.shape[2] // 8 * 8])
            x = torch.from_numpy(f).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
            y = vae.decode(vae.encode(x, chunk_latent_frames=4).mode(), chunk_latent_frames=4)
            scores.append(float(psnr(y, x)[0]))
    result = {"name": a.name, "steps": step, "heldout_psnr_db": round(float(np.mean(scores)), 2),
              "worst_clip_db": round(min(scores), 2), **shape_ceiling(vae, a.ceiling_prompts),
              "load_average": round(os.getloadavg()[0], 2), **vars(a)}
    print(json.dumps(result), flush=True)
    with open(a.results, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
