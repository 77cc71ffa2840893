"""`sora caption`: a descriptive caption for every clip (HF captioner on a Ray actor pool, or sidecars)."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import Progress, formatter


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
        "captioner); clips that already have one are skipped; failures go to DATA/quarantine.",
        epilog="examples:\n  sora caption --data data/ds                      # sidecar captions.jsonl\n"
        "  sora caption --data data/ds --model runs/captioner --batch-size 16",
    )
    p.add_argument("--data", required=True, help="dataset directory or URL (from `sora ingest`)")
    p.add_argument("--model", default=None, help="local Hugging Face captioner directory (default: use sidecars)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per model call (default 8)")
    p.add_argument("--frames", type=int, default=4, help="frames sampled per clip (default 4)")
    p.add_argument("--actors", type=int, default=1, help="model replicas (actors) (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.caption import CaptionConfig, run_caption
    from pipelines.ray_utils import ensure_ray

    if args.batch_size < 1 or args.frames < 1 or args.actors < 1:
        raise SystemExit("sora caption: --batch-size, --frames and --actors must be at least 1")
    if args.model:
        ensure_ray()
    bar = Progress(None, "caption clips")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar(done - bar.done)

    cfg = CaptionConfig(model=args.model, batch_size=args.batch_size, num_frames=args.frames, actors=args.actors)
    result = run_caption(args.data, cfg, progress=progress)
    print(json.dumps(result))
    return 0
