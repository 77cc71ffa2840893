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


# --------------------------------------------------------------------------- ingest
def add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="raw video -> native-aspect clips (Ray Data), bad input quarantined",
        formatter_class=_formatter,
        description="List SRC (files, directories, globs, fsspec URLs), probe each file with a\n"
        "deadline, split it into clips at scene cuts and a maximum length, filter (size, frames,\n"
        "aspect, motion), assign a native-aspect bucket, and write DATA/clips and DATA/quarantine\n"
        "(Parquet). Re-runs skip finished sources; results are exactly-once. Never stops on a\n"
        "bad file: it goes to DATA/quarantine with the reason. Summary in DATA/_summary.json.",
        epilog="example:\n  sora ingest data/raw 's3://bucket/videos/*.mp4' --out data/ds",
    )
    p.add_argument("src", nargs="+", help="video files, directories, globs or fsspec URLs")
    p.add_argument("--out", required=True, help="dataset directory or URL (DATA)")
    p.add_argument("--max-clip-seconds", type=float, default=8.0, help="cut longer shots (default 8)")
    p.add_argument("--min-clip-frames", type=int, default=9, help="drop shorter pieces (default 9)")
    p.add_argument("--min-motion", type=float, default=0.0005, help="near-static threshold, 0 keeps all (default 0.0005)")
    p.add_argument("--resolution", default=None, help="force a bucket resolution class, e.g. 144p")
    p.add_argument("--probe-timeout", type=float, default=20.0, help="seconds before a probe is killed")
    p.add_argument("--overwrite", action="store_true", help="redo sources a previous run finished")
    p.set_defaults(func=run_ingest_cmd)


def run_ingest_cmd(args: argparse.Namespace) -> int:
    from pipelines.ingest import IngestConfig, run_ingest
    from pipelines.ray_utils import ensure_ray

    cfg = IngestConfig(
        max_clip_seconds=args.max_clip_seconds,
        min_clip_frames=args.min_clip_frames,
        min_motion=args.min_motion,
        resolution=args.resolution,
        probe_timeout=args.probe_timeout,
        debug_hang_pattern=os.environ.get("SORA_DEBUG_HANG_PATTERN") or None,
    )
    ensure_ray()
    bar = Progress(None, "ingest sources")

    def progress(summary: dict, done: int, total: int) -> None:
        bar.total = total
        bar(1, f"{summary['clips']} clips, {summary['quarantined']} quarantined")

    try:
        summary = run_ingest(args.src, args.out, cfg, overwrite=args.overwrite, progress=progress)
    except FileNotFoundError as e:
        raise SystemExit(f"sora ingest: {e}")
    print(json.dumps({k: summary[k] for k in ("sources_listed", "sources_processed", "sources_skipped_already_done",
                                              "clips", "quarantine_rows", "wall_seconds")}))
    return 0


# --------------------------------------------------------------------------- main
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_synth, add_ingest]


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
