"""`sora deploy`: register the Prefect deployments (data nightly, training weekly, generation on demand) and serve them."""

from __future__ import annotations

import argparse

from flows.commands.common import formatter


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="register + serve the Prefect deployments (data nightly, training weekly, generation on demand)",
        formatter_class=formatter,
        description="Register three deployments on the Prefect server at PREFECT_API_URL (or a\n"
        "temporary local one) and serve them from this process until stopped:\n"
        "  sora-data/nightly        cron 0 2 * * *   ingest -> caption -> encode\n"
        "  sora-training/weekly     cron 0 4 * * 0   train -> eval -> publish\n"
        "  sora-generation/on-demand                 bulk generation of a prompt file\n"
        "Trigger one now with `prefect deployment run sora-generation/on-demand -p prompts=...`.\n"
        "For a Kubernetes work pool use prefect.yaml (`prefect deploy --all`).",
        epilog="example:\n  sora deploy --sources s3://bucket/raw --data s3://bucket/ds --model /models/sora "
        "--vae /models/vae --publish-to s3://bucket/models",
    )
    p.add_argument("--sources", nargs="+", required=True, help="raw video sources for the nightly data flow")
    p.add_argument("--data", required=True, help="dataset directory or URL")
    p.add_argument("--model", required=True, help="model directory the training flow writes (and generation reads)")
    p.add_argument("--vae", default=None, help="VAE directory (default: the training flow trains one)")
    p.add_argument("--publish-to", default=None, help="where trained models are published (dir or URL)")
    p.add_argument("--training-minutes", type=float, default=20.0, help="DiT training budget per weekly run")
    p.add_argument("--prompts", default=None, help="default prompt file for on-demand generation")
    p.add_argument("--videos", default=None, help="default output dir for on-demand generation")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flows.deploy import DeploySettings, serve_deployments

    serve_deployments(DeploySettings(sources=args.sources, data=args.data, model=args.model, vae=args.vae,
                                     publish_to=args.publish_to, training_minutes=args.training_minutes,
                                     prompts=args.prompts, videos=args.videos))
    return 0
