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
    from flows.commands.config_args import add_config_arguments
    from flows.deploy import DeploySettings

    p.add_argument("--sources", nargs="+", required=True, help="raw video sources for the nightly data flow")
    add_config_arguments(p, DeploySettings, exclude=("sources",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flows.commands.config_args import config_from_args
    from flows.deploy import DeploySettings, serve_deployments

    serve_deployments(config_from_args(DeploySettings, args))
    return 0
