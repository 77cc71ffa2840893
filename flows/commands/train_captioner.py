"""`sora train-captioner`: train our own captioner on well-captioned clips, then recaption."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import formatter


def add(sub: argparse._SubParsersAction) -> None:
    from pipelines.train_captioner import CaptionerRunConfig

    from flows.commands.config_args import add_config_arguments

    p = sub.add_parser(
        "train-captioner",
        help="train a small captioner on clips with good captions; score it; recaption all clips",
        formatter_class=formatter,
        description="The DALL-E 3 / Sora recipe: train a descriptive captioner (a small LLaVA-style\n"
        "Hugging Face model) on the clips of DATA that have good captions (sidecar captions.jsonl),\n"
        "data parallel on Ray Train workers, report color/shape/motion accuracy on held-out clips it\n"
        "never saw, and with --recaption recaption every clip with it (model captions then win over\n"
        "sidecars in `sora encode`). OUT is a normal Hugging Face model dir: `sora caption --model OUT`\n"
        "loads it. Besides the captions it learns from attribute tags parsed out of them (colour,\n"
        "shape, size, motion, background; training only). Shapes world, 4,000 clips, 8 minutes on 2\n"
        "cores: colour, shape and motion each >= 0.995 on 200 held-out clips (benchmarks/bench_captioner.py).",
        epilog="example:\n  sora train-captioner --data data/ds --out runs/captioner --preset tiny --max-minutes 8 --recaption",
    )
    p.add_argument("--data", required=True, help="dataset directory (clips + captions)")
    p.add_argument("--out", required=True, help="output model directory")
    add_config_arguments(p, CaptionerRunConfig, exclude=("data", "out"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.train_captioner import CaptionerRunConfig, run_train_captioner

    from flows.commands.config_args import config_from_args

    try:
        cfg = config_from_args(CaptionerRunConfig, args)
    except ValueError as e:
        raise SystemExit(f"sora train-captioner: {e}")
    from pipelines.ray_utils import ensure_ray

    ensure_ray()
    options = {k: v for k, v in vars(cfg).items() if k not in ("data", "out")}
    try:
        summary = run_train_captioner(cfg.data, cfg.out, **options)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sora train-captioner: {e}")
    print(json.dumps(summary))
    return 0
