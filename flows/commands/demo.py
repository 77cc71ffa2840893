"""`sora demo`: the whole system end to end on the embedded shapes world, with a report."""

from __future__ import annotations

import argparse

from flows.commands.common import formatter


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run everything end to end on the shapes world; write report.html + metrics.json",
        formatter_class=formatter,
        description="Shapes world -> data flow (ingest, caption) -> train the VAE, the captioner and\n"
        "the DiT -> samples in 6 aspect ratios plus image-to-video, extension, join and draft ->\n"
        "full -> eval on held-out prompts -> DIR/report.html and DIR/metrics.json.\n"
        "Local Ray and a temporary Prefect server; no network. The default run takes about\n"
        "40 minutes on 2 cores (measured 39.4; it prints its estimate at the start and shows\n"
        "progress); --quick about 3.",
        epilog="examples:\n  sora demo --out demo\n  sora demo --out /tmp/demo-quick --quick",
    )
    p.add_argument("--out", default="demo", help="output directory (default ./demo)")
    p.add_argument("--quick", action="store_true", help="a ~3-minute smoke run with tiny settings")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.demo import demo_flow

    demo_flow(out=args.out, quick=args.quick)
    return 0
