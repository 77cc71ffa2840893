"""`sora ingest`: raw video -> native-aspect clips on Ray Data, bad input quarantined."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import Progress, formatter
from flows.commands.config_args import add_config_arguments, config_from_args
from pipelines.ingest_config import IngestConfig
from pipelines.stage import own_fields_first


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="raw video -> native-aspect clips (Ray Data), bad input quarantined",
        formatter_class=formatter,
        description="List SRC (files, directories, globs, fsspec URLs), probe each file with a\n"
        "deadline, split it into clips at scene cuts and a maximum length, crop black bars,\n"
        "filter (size, frames, aspect, motion), assign a bucket of the content's aspect, and\n"
        "write DATA/clips and DATA/quarantine (Parquet). Reads what phones and cameras write\n"
        "(rotation, H.264/HEVC/AV1/VP9/ProRes/FFV1/MPEG-2/MJPEG, variable frame rate). Re-runs\n"
        "skip finished sources; results are exactly-once. Never stops on a bad file: it goes to\n"
        "DATA/quarantine with the reason. Summary in DATA/_summary.json.\n"
        "Curation (columns of DATA/clips, null where not run): --shots transnetv2 (pretrained\n"
        "shot detector: also dissolves and fades), --score-text (PP-OCR text area), --clip-model\n"
        "DIR (aesthetic score), signatures for --dedup (same footage kept once).",
        epilog="examples:\n  sora ingest data/raw 's3://bucket/videos/*.mp4' --out data/ds\n"
        "  sora ingest footage/ --out data/curated --shots transnetv2 --score-text --dedup",
    )
    p.add_argument("src", nargs="+", help="video files, directories, globs or fsspec URLs")
    p.add_argument("--out", required=True, help="dataset directory or URL (DATA)")
    p.add_argument("--overwrite", action="store_true", help="redo sources a previous run finished")
    add_config_arguments(p.add_argument_group("ingest settings"), IngestConfig, include=own_fields_first(IngestConfig))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(IngestConfig, args)
    except ValueError as e:
        raise SystemExit(f"sora ingest: {e}")
    from pipelines.ingest import run_ingest
    from pipelines.ray_utils import ensure_ray

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
