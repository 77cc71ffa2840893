"""`sora encode`: captioned clips -> latent spacetime patches (Ray Data actor pool)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from flows.commands.common import Progress, formatter
from flows.commands.config_args import add_config_arguments, config_from_args
from pipelines.encode import EncodeConfig
from pipelines.stage import own_fields_first


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="VAE-encode and patchify every captioned clip into DATA/latents (Parquet)",
        formatter_class=formatter,
        description="Decode each captioned clip at its native-aspect bucket size, encode it with the\n"
        "VAE, cut the latents into spacetime patches, embed its caption with the text encoder,\n"
        "and write DATA/latents (plain Parquet: bytes + shape/dtype columns). A Ray Data actor\n"
        "pool loads the VAE and text encoder once per actor (GPUs where present). Clips already\n"
        "encoded are skipped; failures go to DATA/quarantine with the reason. --model takes\n"
        "VAE, text encoder (and its token length) and patch size from a model directory: ours\n"
        "or a diffusers Wan directory (path or URL), so the latents fit that model.",
        epilog="example:\n  sora encode --data data/ds --vae runs/vae\n"
        "  sora encode --data s3://bucket/ds --vae runs/vae --text-encoder models/t5-encoder --actors 4\n"
        "  sora encode --data data/ds --model Wan2.1-T2V-1.3B-Diffusers",
    )
    p.add_argument("--data", required=True, help="dataset directory or URL (clips + captions)")
    add_config_arguments(p, EncodeConfig, include=own_fields_first(EncodeConfig), help={
        "vae": "VAE directory (from `sora train-vae`, or a diffusers video VAE); or give --model",
        "model": "model directory (ours or a diffusers Wan directory; path or URL) whose VAE, text encoder and "
                 "patch size to use, instead of --vae/--text-encoder"})
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.encode import run_encode
    from pipelines.ray_utils import ensure_ray

    from sora.model_dir import check_model_dir, is_url

    if args.vae is not None and not os.path.isfile(os.path.join(args.vae, "config.json")):
        raise SystemExit(f"sora encode: {args.vae} is not a VAE directory (no config.json)")
    local = lambda p: p if p is None or is_url(p) else os.path.abspath(p)  # noqa: E731  (actors may run elsewhere)
    try:
        cfg = config_from_args(EncodeConfig, args, vae=local(args.vae), model=local(args.model))
        if cfg.model is not None:
            check_model_dir(cfg.model)  # its JSON: another architecture is refused here, before Ray starts
    except (OSError, ValueError) as e:
        raise SystemExit(f"sora encode: {e}")
    ensure_ray()
    bar = Progress(None, "encode clips")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar(done - bar.done)

    try:
        result = run_encode(args.data, cfg, progress=progress)
    except FileNotFoundError as e:  # no clips (`sora ingest`), or none captioned (`sora caption`)
        raise SystemExit(f"sora encode: {e}")
    print(json.dumps(result))
    if result["without_caption"]:
        print(f"sora encode: {result['without_caption']} clips have no caption and were left out; "
              f"`sora caption --data {args.data}` captions them", file=sys.stderr)
    return 0
