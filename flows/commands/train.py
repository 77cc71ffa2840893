"""`sora train`: the DiT on DATA/latents with Ray Train, or a fine-tune of a diffusers Wan
directory (--init, in full or with --lora-rank); the output is a complete model dir."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import formatter

# TrainConfig fields that keep the flag names the command had before its flags were generated
FLAGS = {"checkpoint_every_steps": "--checkpoint-every"}
# cond_mode_probs: a dict, set it from Python or a training flow's overrides; use_gpu: --gpu (below)
NOT_FLAGS = ("cond_mode_probs", "use_gpu")


def add(sub: argparse._SubParsersAction) -> None:
    from pipelines.train import TrainConfig

    from flows.commands.config_args import add_config_arguments, field_comments

    p = sub.add_parser(
        "train",
        help="train the DiT (or fine-tune a Wan directory) on DATA/latents (Ray Train), write a model directory",
        formatter_class=formatter,
        description="Train the diffusion transformer with rectified flow on packed native-aspect\n"
        "batches of DATA/latents (written by `sora encode`), streamed with Ray Data and split over\n"
        "--workers Ray Train workers (DDP; FSDP2 + bf16 on GPUs). Each worker writes its shards of\n"
        "the model, EMA and optimizer state (torch.distributed.checkpoint) to --storage (default\n"
        "OUT/checkpoints; local or s3://...). A dead worker is replaced and training goes on from\n"
        "the last checkpoint; running the same command again continues where it stopped, with any\n"
        "--workers (raise --max-steps to train longer). With --optimizer muon on GPUs it trains\n"
        "with DDP, not FSDP2 (Muon needs whole matrices).\n"
        "OUT ends up a model directory: dit/ (EMA weights), vae/, model_index.json.\n\n"
        "With --init DIR (a diffusers Wan 2.1 T2V / Wan 2.2 TI2V directory) it fine-tunes that\n"
        "model instead, on latents encoded for it (`sora encode --model DIR`), in same-shape\n"
        "batches, with AdamW: every weight (OUT: a diffusers directory whose transformer/ is the\n"
        "fine-tuned one, the other components linked to DIR's), or with --lora-rank R a LoRA\n"
        "adapter on the frozen model (OUT/lora: the layout diffusers' load_lora_weights reads;\n"
        "OUT/model_index.json references DIR). Checkpoints then hold only what trains.",
        epilog="example:\n  sora train --data data/ds --vae models/vae --out models/tiny --preset tiny "
        "--workers 2 --max-minutes 20\n  sora train --data s3://bucket/ds --vae models/vae --out models/xl --preset xl "
        "--workers 8 --gpu --storage s3://bucket/ckpt\n"
        "  sora train --data data/wan --init Wan2.1-T2V-1.3B-Diffusers --lora-rank 16 --out models/wan-lora "
        "--lr 1e-4 --tokens-per-step 32760 --max-steps 2000 --gpu",
    )
    p.add_argument("--data", required=True, help="dataset directory or URL holding latents/ (DATA)")
    p.add_argument("--vae", default=None, help="the VAE directory the latents were encoded with (copied into OUT); "
                   "not with --init (the Wan directory's own)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--storage", default=None, help="checkpoint storage dir or URL (default OUT/checkpoints)")
    p.add_argument("--name", default=None, help="run name under --storage; same name = resume "
                   "(default: dit, wan or wan-lora)")
    p.add_argument("--gpu", action="store_true", help=field_comments(TrainConfig)["use_gpu"])
    steps = TrainConfig.__dataclass_fields__["max_steps"].default
    add_config_arguments(p, TrainConfig, exclude=NOT_FLAGS, flags=FLAGS, defaults={"max_steps": None},
                         help={"max_steps": f"stop at this global step (without it and --max-minutes: {steps})"})
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.train import run_training

    try:
        cfg = config(args)
    except ValueError as e:  # TrainConfig's own checks: say which value is wrong
        raise SystemExit(f"sora train: {e}")
    if args.vae is None and cfg.init is None:
        raise SystemExit("sora train: give --vae (the VAE the latents were encoded with) to train our DiT, "
                         "or --init DIR to fine-tune a Wan directory")
    try:
        summary = run_training(args.data, args.out, args.vae, cfg, storage_path=args.storage, name=args.name)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sora train: {e}")
    summary.pop("history", None)
    print(json.dumps(summary))
    return 0


def config(args: argparse.Namespace):
    """The TrainConfig of the flags: TrainConfig's own max_steps when neither --max-steps nor
    --max-minutes is given; Muon trains with DDP (it needs whole matrices, FSDP shards them)."""
    from pipelines.train import TrainConfig

    from flows.commands.config_args import config_from_args

    overrides = {"fsdp": args.fsdp and args.optimizer != "muon", "use_gpu": args.gpu}
    if args.max_steps is None and args.max_minutes is None:
        overrides["max_steps"] = TrainConfig.__dataclass_fields__["max_steps"].default
    return config_from_args(TrainConfig, args, **overrides)
