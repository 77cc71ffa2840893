"""LoRA fine-tuning of a tiny random Wan on shapes-world latents: held-out flow-matching loss of the
base model against the fine-tuned one; and same-shape batches against mixed-shape packs.

    python -m benchmarks.bench_wan_lora [--quick] [--steps S] [--workers W]

1. A tiny random Wan 2.1 T2V-style diffusers directory (tests/wan_tiny.py) and shapes-world clips
   encoded with its own VAE and UMT5 (tests/wan_latents.py): a training set and a held-out set
   drawn with another seed. `sora train --init DIR --lora-rank 8` (``run_training``, real Ray
   Train) fine-tunes it; the held-out loss is measured with fixed noise and timesteps (seeds 0-3,
   the model's own timestep shift, no prompt dropout) on the base model and with the exported
   adapter loaded - the same numbers for the same weights.
2. Train-step throughput of the same LoRA model in this process, tokens/s, at one token budget:
   packs of mixed shapes (the Wan denoiser then runs one forward per shape in the pack) against
   same-shape batches (what ``sora train`` feeds a model whose spec is not ``packed``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import median, report, side_by_side

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def heldout_loss(den, samples, shift: float, seeds=(0, 1, 2, 3)) -> float:
    """Flow-matching loss over every held-out clip (one batch per token grid), fixed draws."""
    from sora.flow import FlowConfig, flow_matching_loss
    from sora.packing import pack

    flow = FlowConfig(shift=shift, p_uncond=0.0)
    losses, weights = [], []
    with torch.no_grad():
        for grid in sorted({s.grid for s in samples}):
            batch = pack([s for s in samples if s.grid == grid])
            for seed in seeds:
                losses.append(flow_matching_loss(den, batch, flow, torch.Generator().manual_seed(seed))[0].item())
                weights.append(batch.num_tokens)
    return float(np.average(losses, weights=weights))


def read_samples(data: str):
    from pipelines.storage import read_table
    from pipelines.train import sample_from_row

    return [sample_from_row(r) for r in read_table(os.path.join(data, "latents")).to_pylist()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer clips and steps (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300, quick 60)")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, TESTS)
    from wan_latents import build_wan_latents
    from wan_tiny import build_tiny_wan

    from pipelines.train import TrainConfig, batch_by_grid, build_model, inspect_latents, plan_model, run_training
    from pipelines.train import train_step
    from sora.packing import batch_by_token_budget
    from sora.wan_lora import load_lora
    from sora.wan_train import empty_prompt_states, load_denoiser

    steps = args.steps or (60 if args.quick else 300)
    n_train, n_held = (24, 12) if args.quick else (96, 32)
    work = tempfile.mkdtemp(prefix="bench-wan-lora-")
    t0 = time.perf_counter()
    base = build_tiny_wan(os.path.join(work, "wan"), "t2v")
    train = build_wan_latents(base, os.path.join(work, "train"), n_train, seed=0)
    held = build_wan_latents(base, os.path.join(work, "held"), n_held, seed=1)
    setup_s = time.perf_counter() - t0

    # 1. the fine-tune, on Ray Train, and the held-out loss before and after. A Ray of this
    # process's own (address="local"): on a shared machine ray.init() would join another's.
    import ray

    os.makedirs(os.path.join(REPO, ".tmp"), exist_ok=True)
    ray_dir = tempfile.mkdtemp(prefix="ray", dir=os.path.join(REPO, ".tmp"))
    ray.init(address="local", num_cpus=max(2, args.workers + 1), include_dashboard=False, _temp_dir=ray_dir)
    cfg = TrainConfig(init=base, lora_rank=args.rank, workers=args.workers, cpus_per_worker=1.0, max_steps=steps,
                      tokens_per_step=96, lr=args.lr, warmup_steps=10, ema_decay=0.99,
                      checkpoint_every_steps=max(steps // 2, 1), checkpoint_every_minutes=None,
                      log_every_steps=max(steps // 6, 1), cache_data=True, seed=0)
    t0 = time.perf_counter()
    summary = run_training(train, os.path.join(work, "out"), None, cfg)
    train_s = time.perf_counter() - t0
    plan = plan_model(train, inspect_latents(train), cfg, None)  # as the run: its defaults decided
    shift = plan.cfg.base_shift  # the tiny Wan's scheduler shift
    torch.set_num_threads(1)
    null = empty_prompt_states(base)
    den = load_denoiser(base, null_text=null).eval()
    held_samples = read_samples(held)
    before = heldout_loss(den, held_samples, shift)
    train_before = heldout_loss(den, read_samples(train), shift)
    load_lora(den, os.path.join(work, "out", "lora"))
    after = heldout_loss(den, held_samples, shift)
    train_after = heldout_loss(den, read_samples(train), shift)
    report("wan_lora_heldout_loss", "held-out flow-matching loss (fixed noise and timesteps)",
           ("base tiny random Wan 2.1 T2V-style", before), (f"+ LoRA r{args.rank} from sora train, {steps} steps", after),
           higher_is_better=False,
           extra={"train_loss_base": round(train_before, 6), "train_loss_lora": round(train_after, 6),
                  "train_clips": n_train, "heldout_clips": n_held, "steps": summary["steps"],
                  "workers": args.workers, "lr": args.lr, "train_seconds": round(train_s, 1),
                  "setup_seconds": round(setup_s, 1), "final_train_loss": summary["final_loss"]})

    # 2. mixed-shape packs vs same-shape batches, the same LoRA model, in this process
    core, model, optimizer, flops = build_model(plan.loop_config(), plan.cfg, torch.device("cpu"), 1)
    samples = read_samples(train)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    stream = [samples[i] for i in order]
    packs = list(batch_by_token_budget(stream, plan.cfg.tokens_per_step))
    buckets = list(batch_by_grid(stream, plan.cfg.tokens_per_step))
    flow = plan.cfg.flow()

    def run(batches):
        def go():
            for i, b in enumerate(batches):
                train_step(model, b, i + 1, optimizer, plan.cfg, flow, flops, torch.device("cpu"), 0, 1,
                           contextlib.nullcontext())
        return go

    tb, to = side_by_side(run(packs), run(buckets), repeats=1 if args.quick else 3)
    tokens = sum(s.num_tokens for s in samples)
    forwards = lambda batches: sum(len({s.grid for s in b}) for b in batches)  # noqa: E731
    report("wan_lora_batches", "train-step throughput", ("mixed-shape packs (one Wan forward per shape)",
                                                          tokens / median(tb)),
           ("same-shape batches (sora train --init)", tokens / median(to)), higher_is_better=True, unit="tokens/s",
           extra={"packs": len(packs), "pack_forwards": forwards(packs), "batches": len(buckets),
                  "tokens_per_step": plan.cfg.tokens_per_step, "epoch_tokens": tokens,
                  "mean_tokens_per_pack": round(tokens / len(packs), 1),
                  "mean_tokens_per_batch": round(tokens / len(buckets), 1)})
    ray.shutdown()
    shutil.rmtree(ray_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
