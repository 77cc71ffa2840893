"""Packed (token budget, NaViT) vs pad-to-longest batching of a mixed-aspect token set, with
the DiT's real training step (flow-matching loss, forward + backward), side by side in one run.

    python -m benchmarks.bench_packing [--quick] [--preset tiny] [--videos N]

The token set: shapes-world-like videos at all 6 aspect ratios (16:9, 9:16, 1:1, 4:3, 3:4,
2.39:1), two resolution classes and three lengths, as native-aspect buckets (sora.buckets)
-> latent grids (x4 time, x8 space) -> (1, 2, 2) patches. Token values are random: the cost
does not depend on them.
- baseline: fixed-count batches in stream order, each padded to its longest video
  (`batch_by_count` + `pad_batch`, run through `DiT.forward_padded`'s path);
- ours: packs filled up to a token budget (`batch_by_token_budget` + `pack`).
The batch size of the baseline is chosen so that both average the same number of *real*
tokens per step. Both go through the same attention kernel (dense masked SDPA on CPU), so the
difference is the padding the baseline computes. Reported: padding fraction of each, and
useful (real) tokens per second of forward + backward.
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch

from benchmarks.common import median, report, side_by_side
from sora.buckets import assign_bucket
from sora.dit import DiT, DiTConfig
from sora.flow import FlowConfig, flow_matching_loss
from sora.packing import Sample, batch_by_count, batch_by_token_budget, pack, pad_batch, padding_fraction
from sora.patches import grid_for, position_ids

ASPECTS = [(16, 9), (9, 16), (1, 1), (4, 3), (3, 4), (239, 100)]


def mixed_aspect_samples(n: int, config: DiTConfig, resolutions=("64p", "96p"), frames=(9, 17, 33),
                         seed: int = 0) -> list[Sample]:
    """n videos cycling through aspect x resolution x length, shuffled; random tokens and text."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    kinds = list(itertools.product(ASPECTS, resolutions, frames))
    samples = []
    for i in range(n):
        (aw, ah), res, f = kinds[i % len(kinds)]
        bucket = assign_bucket(aw * 120, ah * 120, f, resolution=res)
        grid = grid_for(bucket.latent_shape(), config.patch_size)
        n_tok = grid[0] * grid[1] * grid[2]
        L = rng.randint(8, 20)
        samples.append(Sample(tokens=torch.randn(n_tok, config.in_dim, generator=g), positions=position_ids(grid),
                              grid=grid, text=torch.randn(L, config.text_dim, generator=g)))
    rng.shuffle(samples)
    return samples


def train_steps(model: DiT, batches, cfg: FlowConfig, collate, device: torch.device) -> None:
    """One forward + backward per batch (no optimizer: its cost is the same for both)."""
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        loss, _ = flow_matching_loss(model, collate(batch).to(device), cfg, g)
        loss.backward()
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer videos, one repeat")
    ap.add_argument("--preset", default="tiny", help="DiT preset (default tiny)")
    ap.add_argument("--videos", type=int, default=None, help="videos in the token set (default 36, quick 18)")
    ap.add_argument("--budget", type=int, default=1536, help="packing token budget per step (default 1536)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    n = args.videos or (18 if args.quick else 36)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.manual_seed(0)
    config = DiTConfig.preset(args.preset)
    model = DiT(config).train().to(device)
    # a trained-looking model: adaLN-Zero's zero gates would skip most of the backward work
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    flow = FlowConfig(cond_mode_probs={"none": 1.0}, p_uncond=0.1)
    samples = mixed_aspect_samples(n, config)
    largest = max(s.num_tokens for s in samples)
    assert largest <= args.budget, f"budget {args.budget} below the largest video ({largest} tokens)"
    real = sum(s.num_tokens for s in samples)

    packs = list(batch_by_token_budget(samples, args.budget))
    per_step = real / len(packs)  # real tokens per packed step
    batch_size = max(1, round(per_step / (real / n)))  # same real tokens per step on average
    padded = list(batch_by_count(samples, batch_size))
    pad_frac_padded = padding_fraction(padded)
    pad_frac_packed = padding_fraction(packs, max_tokens=args.budget)

    t_pad, t_pack = side_by_side(lambda: train_steps(model, padded, flow, pad_batch, device),
                                 lambda: train_steps(model, packs, flow, pack, device), repeats=repeats, warmup=1)
    tps_pad, tps_pack = real / median(t_pad), real / median(t_pack)
    extra = {"device": str(device), "videos": n, "real_tokens": real, "preset": args.preset, "token_budget": args.budget,
             "padded_batch_size": batch_size, "padded_steps": len(padded), "packed_steps": len(packs),
             "largest_video_tokens": largest, "seconds_padded": t_pad, "seconds_packed": t_pack}
    report("packing_padding", "padding fraction (compute slots holding no real token)",
           (f"pad-to-longest, {batch_size} videos/batch", pad_frac_padded),
           (f"token-budget packing, {args.budget} tokens/pack (unused budget)", pad_frac_packed),
           higher_is_better=False, extra=extra)
    report("packing_throughput", "real tokens/s, forward+backward", (f"pad-to-longest, {batch_size} videos/batch", tps_pad),
           (f"token-budget packing, {args.budget} tokens/pack", tps_pack), higher_is_better=True, unit="tokens/s",
           extra=extra)


if __name__ == "__main__":
    main()
