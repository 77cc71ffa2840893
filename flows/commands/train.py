"""`sora train`: the DiT on DATA/latents with Ray Train; the output is a complete model dir."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import formatter


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the DiT on DATA/latents (Ray Train), write a complete model directory",
        formatter_class=formatter,
        description="Train the diffusion transformer with rectified flow on packed native-aspect\n"
        "batches of DATA/latents (written by `sora encode`), streamed with Ray Data and split over\n"
        "--workers Ray Train workers (DDP; FSDP2 + bf16 on GPUs). Checkpoints (model, EMA, optimizer,\n"
        "step, data progress) go to --storage (default OUT/checkpoints; local or s3://...). A dead\n"
        "worker is replaced and training goes on from the last checkpoint; running the same\n"
        "command again continues where it stopped (raise --max-steps to train longer).\n"
        "OUT ends up a model directory: dit/ (EMA weights), vae/, model_index.json.",
        epilog="example:\n  sora train --data data/ds --vae models/vae --out models/tiny --preset tiny "
        "--workers 2 --max-minutes 20\n  sora train --data s3://bucket/ds --vae models/vae --out models/xl --preset xl "
        "--workers 8 --gpu --storage s3://bucket/ckpt",
    )
    p.add_argument("--data", required=True, help="dataset directory or URL holding latents/ (DATA)")
    p.add_argument("--vae", required=True, help="the VAE directory the latents were encoded with (copied into OUT)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--preset", default="tiny", help="DiT size: tiny, small, base, large, xl (default tiny)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes of this run")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this global step (default 2000 "
                   "unless --max-minutes is given)")
    p.add_argument("--storage", default=None, help="checkpoint storage dir or URL (default OUT/checkpoints)")
    p.add_argument("--name", default="dit", help="run name under --storage; same name = resume (default dit)")
    p.add_argument("--tokens-per-step", type=int, default=4096, help="token budget of a pack per worker (default 4096)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                   help="adamw, or muon: Muon on the blocks' weight matrices, AdamW on the rest; on the "
                        "shapes world it reaches AdamW's loss in ~half the steps (docs/experiments.md). With --gpu "
                        "it trains with DDP instead of FSDP2 (Muon needs whole matrices) (default adamw)")
    p.add_argument("--muon-lr", type=float, default=None, help="learning rate of the Muon part (default: --lr)")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps (default 100)")
    p.add_argument("--schedule", choices=("constant", "cosine", "cooldown"), default="constant",
                   help="learning rate after warmup: constant (default); cosine to --min-lr-ratio x lr at "
                        "--max-steps; cooldown: constant, then linear to --min-lr-ratio x lr over the last "
                        "--cooldown-fraction of --max-steps or --max-minutes, whichever is further along")
    p.add_argument("--cooldown-fraction", type=float, default=0.2, help="share of the run the cooldown takes (default 0.2)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="where cosine/cooldown end, as a fraction of --lr (default 0.1)")
    p.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA of the weights (the exported model); for runs of a few thousand steps use "
                        "~0.995, or the EMA stays near the initial weights (default 0.9999)")
    p.add_argument("--fg-weight", type=float, default=1.0,
                   help="loss weight of salient tokens (far from their frame's median token), 1 for the flat "
                        "background: a plain-background dataset's objects count for more (default 1: all alike)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps (default 500)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker: FSDP2, bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (GPU)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward (GPU)")
    p.add_argument("--peak-flops", type=float, default=None, help="per-worker peak FLOP/s for MFU (default: by GPU name)")
    p.add_argument("--cache-data", action="store_true", help="hold the latents in Ray's object store (small data)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.train import run_training

    max_steps = args.max_steps if args.max_steps is not None or args.max_minutes is not None else 2000
    try:
        cfg = _config(args, max_steps)
    except (AssertionError, ValueError) as e:  # TrainConfig's own checks: say which value is wrong
        raise SystemExit(f"sora train: {e}")
    try:
        summary = run_training(args.data, args.out, args.vae, cfg, storage_path=args.storage, name=args.name)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sora train: {e}")
    summary.pop("history", None)
    print(json.dumps(summary))
    return 0


def _config(args: argparse.Namespace, max_steps: int | None):
    from pipelines.train import TrainConfig

    return TrainConfig(
        preset=args.preset, workers=args.workers, max_minutes=args.max_minutes, max_steps=max_steps,
        tokens_per_step=args.tokens_per_step, lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        checkpoint_every_steps=args.checkpoint_every, cpus_per_worker=args.cpus_per_worker, use_gpu=args.gpu,
        compile=args.compile, activation_checkpointing=args.activation_checkpointing, peak_flops=args.peak_flops,
        cache_data=args.cache_data, seed=args.seed, optimizer=args.optimizer, muon_lr=args.muon_lr,
        fg_weight=args.fg_weight, schedule=args.schedule, cooldown_fraction=args.cooldown_fraction,
        min_lr_ratio=args.min_lr_ratio,
        fsdp=args.optimizer != "muon",
    )
