"""`sora generate-bulk`: a prompts file -> videos + a manifest, on Ray Data, resumable."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import Progress, formatter
from flows.commands.config_args import add_config_arguments, config_from_args
from pipelines.generate_bulk import BulkConfig
from pipelines.stage import own_fields_first


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
        epilog="examples:\n  sora generate-bulk --model model --prompts prompts.jsonl --out s3://bucket/run1 --size 160x90\n"
        "  sora generate-bulk --model Wan2.1-T2V-1.3B-Diffusers --lora adapter --prompts prompts.jsonl --out run2",
    )
    p.add_argument("--model", required=True, help="model directory: ours (from `sora train`) or a diffusers Wan "
                   "directory; a path or fsspec URL")
    p.add_argument("--prompts", required=True, help="prompts file or URL (.jsonl, .csv, .parquet)")
    p.add_argument("--out", required=True, help="output directory or URL")
    add_config_arguments(p, BulkConfig, include=own_fields_first(BulkConfig), flags={"guidance_scale": "--guidance"})
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.generate_bulk import run_generate_bulk
    from pipelines.ray_utils import ensure_ray
    from sora.model_dir import ModelSource

    try:
        cfg = config_from_args(BulkConfig, args)
        ModelSource(args.model, cfg.lora, cfg.lora_scale).check()  # JSON and adapter only, before Ray starts
    except (OSError, ValueError) as e:
        raise SystemExit(f"sora generate-bulk: {e}")
    ensure_ray()
    bar = Progress(None, "generate-bulk videos")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar(done - bar.done)

    try:
        summary = run_generate_bulk(args.model, args.prompts, args.out, cfg, progress=progress)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sora generate-bulk: {e}")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0
