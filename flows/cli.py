"""The `sora` command line: one subcommand per job.

The CLI is the top layer (it may call `sora`, `pipelines` and `flows`), so it lives here.
Each subcommand imports its heavy modules only when it runs, so `sora --help` and
`sora synth` never start Ray.

    sora synth --out data/raw --n 200 --seed 1      # the shapes world: videos + captions.jsonl
    sora --help                                     # every job
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

# Offline by design (ENV.md): never reach a model hub; keep Ray's telemetry off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class Progress:
    """A one-line progress display on stderr (no dependency; works in CI logs too).

    Prints at most a few times per second, and always the final state."""

    def __init__(self, total: int | None, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.done, self.start, self._last = 0, time.monotonic(), 0.0

    def __call__(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last < 0.25 and (self.total is None or self.done < self.total):
            return
        self._last = now
        rate = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        eta = f" eta {(self.total - self.done) / rate:.0f}s" if self.total and rate > 0 else ""
        self.stream.write(f"\r{self.label}: {self.done}{of} ({rate:.1f}/s{eta}) {note}".ljust(78))
        if self.total is not None and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


# --------------------------------------------------------------------------- synth
def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a shapes-world video dataset (videos + captions.jsonl)",
        formatter_class=_formatter,
        description="Render the procedural shapes world (DESIGN.md) to H.264 mp4 files of many\n"
        "aspect ratios, sizes, lengths and frame rates, plus captions.jsonl with the\n"
        "attributes and both caption forms of every clip. The same seed gives the same bytes.",
        epilog="example:\n  sora synth --out data/raw --n 200 --seed 1",
    )
    p.add_argument("--out", required=True, help="output directory (local path or fsspec URL)")
    p.add_argument("--n", type=int, default=200, help="number of clips (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed; clip i depends only on (seed, i)")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from sora.shapes import synth_dataset

    if args.n < 1:
        raise SystemExit("sora synth: --n must be at least 1")
    progress = Progress(args.n, "synth")
    rows = synth_dataset(args.out, args.n, args.seed, progress=lambda *_: progress())
    ratios = sorted({r["aspect_ratio"] for r in rows if "aspect_ratio" in r})
    print(json.dumps({"out": args.out, "videos": len(rows), "aspect_ratios": ratios}))
    return 0


# --------------------------------------------------------------------------- main
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_synth]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sora",
        formatter_class=_formatter,
        description="The Sora recipe on Ray: raw video in, a text-to-video model out.\n"
        "Runs locally by default; set RAY_ADDRESS / PREFECT_API_URL and use fsspec URLs\n"
        "(s3://, gs://, ...) to run the same commands on a cluster.",
        epilog="run `sora COMMAND --help` for each command's options and an example.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
