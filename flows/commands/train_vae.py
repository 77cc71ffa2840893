"""`sora train-vae`: train the causal 3D VAE (video compression network) on Ray Train."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import formatter


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-vae",
        help="train the causal 3D VAE on DATA/clips (Ray Train, DDP), report held-out PSNR",
        formatter_class=formatter,
        description="Train the video compression network (4x time, 8x8 space) on images and videos of\n"
        "every aspect ratio in DATA/clips: Ray Train DDP (gloo on CPU, NCCL on GPU), reconstruction\n"
        "+ KL loss, Muon on the conv kernels (AdamW on the rest), checkpoints. Re-running the same\n"
        "command continues from the last checkpoint. At the end: PSNR on held-out clips, latent\n"
        "statistics, and OUT/ (config.json + model.safetensors) that `sora encode` loads.",
        epilog="example:\n  sora train-vae --data data/ds --out runs/vae --preset tiny --max-minutes 10",
    )
    p.add_argument("--data", required=True, help="dataset directory or URL (from `sora ingest`)")
    p.add_argument("--out", required=True, help="output VAE directory")
    p.add_argument("--preset", default="tiny", choices=["tiny", "base"], help="model size (default tiny)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--max-minutes", type=float, default=10.0, help="training time budget (default 10)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=4, help="crops per worker per step (default 4)")
    p.add_argument("--holdout", type=int, default=100, help="held-out clips for PSNR (default 100)")
    p.add_argument("--gpu", action="store_true", help="train on GPUs (one per worker)")
    p.add_argument("--storage", default=None, help="Ray Train storage path/URL for checkpoints (default OUT/_train)")
    p.add_argument("--latent-stats", default="scalar", choices=["scalar", "channel"],
                   help="latent normalisation fitted after training: one shift/scale (default) or a "
                        "mean/std per latent channel")
    p.add_argument("--optimizer", default="muon", choices=["muon", "adamw"],
                   help="muon (default): Muon on the hidden conv kernels, AdamW on the rest; adamw: AdamW on all")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--muon-lr", type=float, default=1.5e-3,
                   help="Muon learning rate, AdamW-matched scale (default 1.5e-3)")
    p.add_argument("--fg-weight", type=float, default=8.0,
                   help="extra loss weight of object pixels (default 8; 0 = plain mean over pixels)")
    p.add_argument("--image-prob", type=float, default=0.6,
                   help="fraction of steps on single images rather than 9-frame clips (default 0.6)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.ray_utils import ensure_ray
    from pipelines.train_vae import VAETrainConfig, run_train_vae

    if args.workers < 1 or args.max_minutes <= 0:
        raise SystemExit("sora train-vae: --workers must be >= 1 and --max-minutes > 0")
    try:
        cfg = VAETrainConfig(data=args.data, out=args.out, preset=args.preset, workers=args.workers,
                             max_minutes=args.max_minutes, max_steps=args.max_steps, batch_size=args.batch_size,
                             holdout=args.holdout, use_gpu=args.gpu, storage=args.storage,
                             latent_stats=args.latent_stats, optimizer=args.optimizer, lr=args.lr,
                             muon_lr=args.muon_lr, fg_weight=args.fg_weight, image_prob=args.image_prob)
    except AssertionError as e:
        raise SystemExit(f"sora train-vae: {e}")
    ensure_ray()
    try:
        summary = run_train_vae(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sora train-vae: {e}")
    print(f"held-out PSNR: {summary['heldout_psnr_db']:.2f} dB on {summary['heldout_clips']} clips "
          f"after {summary['steps']} steps ({summary['train_minutes']:.1f} min)")
    print(json.dumps(summary))
    return 0
