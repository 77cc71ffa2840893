"""Side-by-side DiT training recipes on the shapes world: does the model learn a coherent object?

Not a pass/fail benchmark: a small controlled harness for the comparisons recorded in
BENCHMARKS.md and in `VAETrainConfig.latent_stats`. One process,
one thread, a fixed number of optimizer steps (not a time budget, so a busy machine changes
only how long it takes, never the result). It trains a bare tiny DiT on the first N clips of
a `DATA/latents` table (sorted by clip id), then regenerates each of the first 48 of those clips
from its OWN caption at its own size and scores the video with `sora.evaluator`. That is a
memorisation test: it asks whether training makes coherent, prompt-following objects at all,
before any question of generalising to unseen combinations.

    python -m benchmarks.dit_recipes --data runs/demo/data --vae runs/demo/vae
    python -m benchmarks.dit_recipes --data runs/demo/data --vae runs/demo/vae --pooled-text none

Prints one JSON line (and appends it to --results when given).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a dataset dir with latents (from `sora encode`)")
    ap.add_argument("--vae", required=True, help="the VAE dir those latents came from (to decode samples)")
    ap.add_argument("--clips", type=int, default=64, help="training clips (default 64)")
    ap.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per pack (default 2048)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--pooled-text", default=None, choices=["none", "mean"],
                    help="DiTConfig.pooled_text (pooled prompt in adaLN; default: the preset's)")
    ap.add_argument("--base-shift", type=float, default=None, help="TrainConfig.base_shift (timestep shift)")
    ap.add_argument("--t-mean", type=float, default=None, help="logit-normal location of training timesteps")
    ap.add_argument("--first-prob", type=float, default=None,
                    help="share of videos trained image-to-video (clean first frame), taken from the text-only share")
    ap.add_argument("--abs-pos", default=None, choices=["none", "fractional"],
                    help="DiTConfig.abs_pos (absolute fractional position embedding; default: the preset's)")
    ap.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    ap.add_argument("--width", type=int, default=None, help="override the preset's hidden size (heads of 32 dims)")
    ap.add_argument("--seed", type=int, default=0, help="init, data order and noise seed")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--results", default=None, help="append the JSON line to this file")
    args = ap.parse_args()

    import numpy as np
    import torch

    from pipelines.latents import read_latents
    from pipelines.train import TrainConfig, sample_from_row
    from sora.dit import DiT, DiTConfig
    from sora.evaluator import score
    from sora.flow import flow_matching_loss, resolution_shift, time_grid
    from sora.optim import LRSchedule, lr_at
    from sora.packing import batch_by_token_budget, pack
    from sora.patches import unpatchify
    from sora.samplers import euler, guided_velocity
    from sora.shapes import parse_prompt
    from sora.vae import load_vae

    torch.set_num_threads(1)
    vae = load_vae(args.vae).eval()
    rows = sorted(read_latents(args.data).to_pylist(), key=lambda r: r["clip_id"])[: args.clips]
    assert rows, f"no latents rows in {args.data}"
    samples = [sample_from_row(r) for r in rows]
    channels = int(rows[0]["latent_channels"])
    patch = (int(rows[0]["patch_t"]), int(rows[0]["patch_h"]), int(rows[0]["patch_w"]))
    cfg = DiTConfig.preset(args.preset, in_channels=channels, patch_size=patch, text_dim=samples[0].text.shape[-1],
                           **({} if args.pooled_text is None else {"pooled_text": args.pooled_text}),
                           **({} if args.abs_pos is None else {"abs_pos": args.abs_pos}),
                           **({} if args.depth is None else {"depth": args.depth}),
                           **({} if args.width is None else {"hidden_size": args.width, "num_heads": args.width // 32}))
    torch.manual_seed(args.seed)
    model = DiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    schedule = LRSchedule(lr=args.lr, warmup_steps=100)  # 100 warmup steps, then constant
    flow = TrainConfig().flow()  # the timestep/conditioning/dropout settings `sora train` uses
    if args.base_shift is not None:
        flow.shift = args.base_shift
    if args.t_mean is not None:
        flow.t_mean = args.t_mean
    if args.first_prob is not None:
        probs = dict(flow.cond_mode_probs)
        probs["none"] += probs["first"] - args.first_prob
        probs["first"] = args.first_prob
        assert probs["none"] >= 0, f"--first-prob {args.first_prob} leaves no room for the other modes"
        flow.cond_mode_probs = probs
    g = torch.Generator().manual_seed(args.seed)
    t0, step, losses = time.time(), 0, []
    while step < args.steps:
        order = torch.randperm(len(samples), generator=g).tolist()
        for batch in batch_by_token_budget([samples[i] for i in order], args.tokens):
            for group in opt.param_groups:
                group["lr"] = lr_at(step + 1, schedule)
            loss, _ = flow_matching_loss(model, pack(batch), flow, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 100 == 0:
                print(f"step {step}/{args.steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f} s)", flush=True)
            if step >= args.steps:
                break
    train_s = time.time() - t0

    model.eval()
    right = {k: 0 for k in ("color", "shape", "size", "motion")}
    scored = rows[:48]
    for i, (row, s) in enumerate(zip(scored, samples)):
        seq = torch.zeros(s.num_tokens, dtype=torch.long)
        velocity = guided_velocity(model, s.positions, seq, s.text[None], s.text_mask[None], args.guidance)
        noise = torch.randn(s.tokens.shape, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            # the sampling shift `SoraPipeline` would use for a model trained with this flow
            shift = (resolution_shift(s.num_tokens, flow.base_tokens, flow.shift) if flow.base_tokens
                     else flow.shift)
            x = euler(velocity, noise, time_grid(args.sample_steps, shift))
            z = unpatchify(x, s.grid, patch, channels)  # (C, T, H, W)
            video = vae.decode_latents(z[None])[0]  # (3, T, H, W) in [-1, 1]
        frames = ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
        result = score(frames, parse_prompt(row["caption"]))
        for k in right:
            right[k] += bool(result[f"{k}_ok"])
    line = {"benchmark": "dit_recipes", "data": args.data, "clips": len(rows), "steps": args.steps, "lr": args.lr,
            "tokens": args.tokens, "preset": args.preset, "depth": cfg.depth, "width": cfg.hidden_size,
            "pooled_text": cfg.pooled_text, "abs_pos": cfg.abs_pos, "seed": args.seed, "shift": flow.shift, "t_mean": flow.t_mean,
            "cond_mode_probs": flow.cond_mode_probs,
            "loss_last100": round(float(np.mean(losses[-100:])), 4), "train_seconds": round(train_s),
            "scored_clips": len(scored), **{k: round(v / len(scored), 3) for k, v in right.items()}}
    print(json.dumps(line), flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
