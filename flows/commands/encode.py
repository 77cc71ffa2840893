"""`sora encode`: captioned clips -> latent spacetime patches (Ray Data actor pool)."""

from __future__ import annotations

import argparse
import json
import os

from flows.commands.common import Progress, formatter


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="VAE-encode and patchify every captioned clip into DATA/latents (Parquet)",
        formatter_class=formatter,
        description="Decode each captioned clip at its native-aspect bucket size, encode it with the\n"
        "VAE, cut the latents into spacetime patches, embed its caption with the text encoder,\n"
        "and write DATA/latents (plain Parquet: bytes + shape/dtype columns). A Ray Data actor\n"
        "pool loads the VAE and text encoder once per actor (GPUs where present). Clips already\n"
        "encoded are skipped; failures go to DATA/quarantine with the reason.",
        epilog="example:\n  sora encode --data data/ds --vae runs/vae\n"
        "  sora encode --data s3://bucket/ds --vae runs/vae --text-encoder models/t5-encoder --actors 4",
    )
    p.add_argument("--data", required=True, help="dataset directory or URL (clips + captions)")
    p.add_argument("--vae", required=True, help="VAE directory (from `sora train-vae`, or a diffusers video VAE)")
    p.add_argument("--text-encoder", default=None, help="local HF text encoder dir (default: the offline MiniLM)")
    p.add_argument("--patch-size", default="1,2,2", help="spacetime patch size t,h,w (default 1,2,2)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per actor call (default 4)")
    p.add_argument("--actors", type=int, default=1, help="actors (model replicas) (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.encode import EncodeConfig, run_encode
    from pipelines.ray_utils import ensure_ray

    if not os.path.isfile(os.path.join(args.vae, "config.json")):
        raise SystemExit(f"sora encode: {args.vae} is not a VAE directory (no config.json)")
    try:
        patch = tuple(int(v) for v in args.patch_size.split(","))
        assert len(patch) == 3 and min(patch) >= 1
    except (ValueError, AssertionError):
        raise SystemExit(f"sora encode: --patch-size must be three positive integers t,h,w, got {args.patch_size!r}")
    ensure_ray()
    bar = Progress(None, "encode clips")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar(done - bar.done)

    cfg = EncodeConfig(vae=os.path.abspath(args.vae), text_encoder=args.text_encoder, patch_size=patch,
                       batch_size=args.batch_size, actors=args.actors)
    print(json.dumps(run_encode(args.data, cfg, progress=progress)))
    return 0
