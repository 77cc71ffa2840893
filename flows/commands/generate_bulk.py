"""`sora generate-bulk`: a prompts file -> videos + a manifest, on Ray Data, resumable."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import Progress, formatter


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate-bulk",
        help="generate every prompt of a JSONL/CSV/Parquet file (Ray Data), resumable",
        formatter_class=formatter,
        description="Generate one video per row of PROMPTS (JSONL, CSV or Parquet; local or an fsspec\n"
        "URL). Columns: prompt (required); optional id, size (WxH) or width+height, frames or\n"
        "seconds, fps, seed, image, negative_prompt, steps, guidance_scale. One model per Ray\n"
        "actor (a GPU each where the cluster has them); requests of one shape are generated\n"
        "together. Writes OUT/videos/<id>.mp4 and OUT/manifest/*.parquet (one row per input row:\n"
        "id, prompt, parameters, seed, path, status, error, seconds). A bad row becomes an error\n"
        "row and the run goes on. Re-running skips ids already in the manifest.",
        epilog="example:\n  sora generate-bulk --model model --prompts prompts.jsonl --out s3://bucket/run1 --size 160x90",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--prompts", required=True, help="prompts file or URL (.jsonl, .csv, .parquet)")
    p.add_argument("--out", required=True, help="output directory or URL")
    p.add_argument("--size", default=None, help="default WxH for rows without one (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="default frame count for rows without one")
    p.add_argument("--fps", type=float, default=None, help="default fps")
    p.add_argument("--steps", type=int, default=None, help="default sampling steps")
    p.add_argument("--guidance", type=float, default=None, help="default guidance scale")
    p.add_argument("--seed", type=int, default=0, help="base seed for rows without a seed")
    p.add_argument("--batch-size", type=int, default=8, help="same-shape requests per model call (default 8)")
    p.add_argument("--actors", type=int, default=1, help="model replicas (Ray actors, default 1)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default: 1 if the cluster has any)")
    p.add_argument("--retry-errors", action="store_true", help="re-run ids whose manifest row is an error")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from pipelines.generate_bulk import BulkConfig, run_generate_bulk
    from pipelines.ray_utils import ensure_ray
    from sora.conditioning import parse_size

    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise SystemExit(f"sora generate-bulk: --model {args.model!r} is not a model directory (no model_index.json)")
    if args.size is not None:
        try:
            parse_size(args.size)
        except ValueError as e:
            raise SystemExit(f"sora generate-bulk: --size: {e}")
    if args.batch_size < 1 or args.actors < 1:
        raise SystemExit("sora generate-bulk: --batch-size and --actors must be at least 1")
    cfg = BulkConfig(size=args.size, frames=args.frames, fps=args.fps, steps=args.steps,
                     guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size,
                     actors=args.actors, num_gpus=args.num_gpus, retry_errors=args.retry_errors, limit=args.limit)
    ensure_ray()
    bar = Progress(None, "generate-bulk batches")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar(1)

    try:
        summary = run_generate_bulk(args.model, args.prompts, args.out, cfg, progress=progress)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sora generate-bulk: {e}")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0
