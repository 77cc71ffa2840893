"""`sora caption`: a descriptive caption for every clip (HF captioner on a Ray actor pool, or sidecars)."""

from __future__ import annotations

import argparse
import json
import sys

from flows.commands.common import Progress, formatter
from flows.commands.config_args import add_config_arguments, config_from_args
from pipelines.caption import CaptionConfig
from pipelines.stage import own_fields_first


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="caption every clip (any HF image-text-to-text model, or captions.jsonl sidecars)",
        formatter_class=formatter,
        description="Sample frames of every clip in DATA/clips and ask a captioner for a descriptive\n"
        "caption: any Hugging Face AutoModelForImageTextToText model from a local directory (its\n"
        "processor and chat template; image-only models get a frame grid), loaded once per Ray\n"
        "actor, on GPUs where the cluster has them. Without --model, captions come from the\n"
        "captions.jsonl sidecar next to each source video. Writes DATA/captions (clip_id, caption,\n"
        "captioner, alignment); clips that already have one are skipped; failures go to\n"
        "DATA/quarantine. With --clip-model, alignment is CLIP's text-image similarity of each new\n"
        "caption and its clip's frames (find weak captions with plain pyarrow, redo them with\n"
        "--recaption); without it the column is null.",
        epilog="examples:\n  sora caption --data data/ds                      # sidecar captions.jsonl\n"
        "  sora caption --data data/ds --model runs/captioner --batch-size 16\n"
        "  sora caption --data data/ds --clip-model models/clip-vit-b32   # sidecars, scored",
    )
    p.add_argument("--data", required=True, help="dataset directory or URL (from `sora ingest`)")
    add_config_arguments(p, CaptionConfig, include=own_fields_first(CaptionConfig), flags={"num_frames": "--frames"})
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.caption import run_caption
    from pipelines.ray_utils import ensure_ray

    try:
        cfg = config_from_args(CaptionConfig, args)
    except ValueError as e:
        raise SystemExit(f"sora caption: {e}")
    if cfg.model:
        ensure_ray()
    bar = Progress(None, "caption clips")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar(done - bar.done)

    try:
        result = run_caption(args.data, cfg, progress=progress)
    except FileNotFoundError as e:  # no clips (`sora ingest`), or no sidecar for any clip
        raise SystemExit(f"sora caption: {e}")
    print(json.dumps(result))
    if result.get("without_sidecar"):
        print(f"sora caption: {result['without_sidecar']} clips have no sidecar caption; caption them with a "
              f"model: `sora caption --data {args.data} --model CAPTIONER_DIR`", file=sys.stderr)
    return 0
