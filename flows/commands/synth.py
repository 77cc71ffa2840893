"""`sora synth`: render the shapes world to videos + captions.jsonl."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import Progress, formatter
from flows.commands.config_args import add_config_arguments, config_from_args


def add(sub: argparse._SubParsersAction) -> None:
    from sora.shapes import ClipRanges

    p = sub.add_parser(
        "synth",
        help="write a shapes-world video dataset (videos + captions.jsonl)",
        formatter_class=formatter,
        description="Render the procedural shapes world to H.264 mp4 files of many aspect\n"
        "ratios, sizes, lengths and frame rates, plus captions.jsonl with the attributes and\n"
        "both caption forms of every clip. The same seed gives the same bytes.",
        epilog="example:\n  sora synth --out data/raw --n 200 --seed 1\n"
        "  sora synth --out data/tiny --n 24 --short-sides 64,72 --frame-counts 9,13",
    )
    p.add_argument("--out", required=True, help="output directory (local path or fsspec URL)")
    p.add_argument("--n", type=int, default=200, help="number of clips (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed; clip i depends only on (seed, i)")
    add_config_arguments(p.add_argument_group("what clips are drawn from"), ClipRanges)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sora.shapes import ClipRanges, synth_dataset

    if args.n < 1:
        raise SystemExit("sora synth: --n must be at least 1")
    try:
        ranges = config_from_args(ClipRanges, args)
    except ValueError as e:
        raise SystemExit(f"sora synth: {e}")
    progress = Progress(args.n, "synth")
    rows = synth_dataset(args.out, args.n, args.seed, progress=lambda *_: progress(), ranges=ranges)
    ratios = sorted({r["aspect_ratio"] for r in rows if "aspect_ratio" in r})
    print(json.dumps({"out": args.out, "videos": len(rows), "aspect_ratios": ratios}))
    return 0
