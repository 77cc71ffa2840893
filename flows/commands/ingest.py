"""`sora ingest`: raw video -> native-aspect clips on Ray Data, bad input quarantined."""

from __future__ import annotations

import argparse
import json
import os

from flows.commands.common import Progress, formatter


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="raw video -> native-aspect clips (Ray Data), bad input quarantined",
        formatter_class=formatter,
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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


