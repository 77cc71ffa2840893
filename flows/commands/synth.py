"""`sora synth`: render the shapes world to videos + captions.jsonl."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import Progress, formatter


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a shapes-world video dataset (videos + captions.jsonl)",
        formatter_class=formatter,
        description="Render the procedural shapes world (docs/architecture.md) to H.264 mp4 files of many\n"
        "aspect ratios, sizes, lengths and frame rates, plus captions.jsonl with the\n"
        "attributes and both caption forms of every clip. The same seed gives the same bytes.",
        epilog="example:\n  sora synth --out data/raw --n 200 --seed 1",
    )
    p.add_argument("--out", required=True, help="output directory (local path or fsspec URL)")
    p.add_argument("--n", type=int, default=200, help="number of clips (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed; clip i depends only on (seed, i)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sora.shapes import synth_dataset

    if args.n < 1:
        raise SystemExit("sora synth: --n must be at least 1")
    progress = Progress(args.n, "synth")
    rows = synth_dataset(args.out, args.n, args.seed, progress=lambda *_: progress())
    ratios = sorted({r["aspect_ratio"] for r in rows if "aspect_ratio" in r})
    print(json.dumps({"out": args.out, "videos": len(rows), "aspect_ratios": ratios}))
    return 0


