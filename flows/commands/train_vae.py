"""`sora train-vae`: train the causal 3D VAE (video compression network) on Ray Train."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import formatter



def add(sub: argparse._SubParsersAction) -> None:
    from pipelines.train_vae import VAETrainConfig

    from flows.commands.config_args import add_config_arguments, field_comments

    p = sub.add_parser(
        "train-vae",
        help="train the causal 3D VAE on DATA/clips (Ray Train, DDP), report held-out PSNR",
        formatter_class=formatter,
        description="Train the video compression network (4x time, 8x8 space) on images and videos of\n"
        "every aspect ratio in DATA/clips: Ray Train DDP (gloo on CPU, NCCL on GPU), reconstruction\n"
        "+ KL loss, Muon on the conv kernels (AdamW on the rest), sharded checkpoints. Re-running the\n"
        "same command continues from the last checkpoint. At the end: PSNR on held-out clips, latent\n"
        "statistics, and OUT/ (config.json + model.safetensors) that `sora encode` loads.",
        epilog="example:\n  sora train-vae --data data/ds --out runs/vae --preset tiny --max-minutes 10",
    )
    p.add_argument("--data", required=True, help="dataset directory or URL (from `sora ingest`)")
    p.add_argument("--out", required=True, help="output VAE directory")
    p.add_argument("--gpu", action="store_true", help=field_comments(VAETrainConfig)["use_gpu"])
    add_config_arguments(p, VAETrainConfig, exclude=("data", "out", "use_gpu"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.ray_utils import ensure_ray
    from pipelines.train_vae import VAETrainConfig, run_train_vae

    from flows.commands.config_args import config_from_args

    try:
        cfg = config_from_args(VAETrainConfig, args, use_gpu=args.gpu)
    except ValueError as e:  # VAETrainConfig's own checks: say which value is wrong
        raise SystemExit(f"sora train-vae: {e}")
    ensure_ray()
    try:
        summary = run_train_vae(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sora train-vae: {e}")
    print(f"held-out PSNR: {summary['heldout_psnr_db']:.2f} dB after {summary['steps']} steps "
          f"({summary['train_minutes']:.1f} min)")
    print(json.dumps(summary))
    return 0
