"""`sora demo`: the whole system end to end on the embedded shapes world, with a report."""

from __future__ import annotations

import argparse
import dataclasses
import os

from flows.commands.common import add_verbose_flag, formatter

PLAN_EXCLUDE = ("dit_overrides",)  # a dict of TrainConfig fields: no flag form


def add(sub: argparse._SubParsersAction) -> None:
    from flows.commands.config_args import add_config_arguments, field_comments
    from flows.demo_plan import PLANS, DemoPlan

    p = sub.add_parser(
        "demo",
        help="run everything end to end on the shapes world; write report.html + metrics.json",
        formatter_class=formatter,
        description="Shapes world -> data flow (ingest, caption) -> train the VAE, the captioner and\n"
        "the DiT -> samples in 6 aspect ratios plus image-to-video, extension, join and draft ->\n"
        "full -> eval on held-out prompts -> DIR/report.html and DIR/metrics.json.\n"
        "Local Ray and a temporary Prefect server; no network. The default run takes about\n"
        "40 minutes on 2 cores (it prints its estimate at the start and one progress line per\n"
        "stage); --quick about 3. Ray's and Prefect's own output goes to DIR/logs/ray.log.\n"
        "The plan's fields below override the default (or --quick) plan one by one.",
        epilog="examples:\n  sora demo --out demo\n  sora demo --out /tmp/demo-quick --quick\n"
        "  sora demo --out /tmp/demo-short --clips 480 --dit-minutes 5",
    )
    p.add_argument("--out", default="demo", help="output directory (default ./demo)")
    p.add_argument("--quick", action="store_true", help="a ~3-minute smoke run with tiny settings")
    add_verbose_flag(p)
    plan = p.add_argument_group("plan (default: the default plan's value; with --quick the quick plan's)")
    default, quick = dataclasses.asdict(PLANS["default"]), dataclasses.asdict(PLANS["quick"])
    comments = field_comments(DemoPlan)
    names = [f.name for f in dataclasses.fields(DemoPlan) if f.name not in PLAN_EXCLUDE]
    show = {n: ",".join(map(str, quick[n])) if isinstance(quick[n], (tuple, list)) else quick[n] for n in names}
    add_config_arguments(plan, DemoPlan, exclude=PLAN_EXCLUDE, defaults={n: default[n] for n in names},
                         help={n: f"{comments.get(n, n)}; --quick: {show[n]}" for n in names})
    p.set_defaults(func=run, **{n: None for n in names})  # None: the chosen plan's value


def plan_overrides(args: argparse.Namespace) -> dict:
    """The plan fields given on the command line."""
    from flows.demo_plan import DemoPlan

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoPlan)
            if f.name not in PLAN_EXCLUDE and getattr(args, f.name, None) is not None}


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's temporary server can take longer than its 20 s default to start on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.commands.common import quiet_console
    from flows.demo import demo_flow  # imports Prefect: its console handler exists before quiet_console
    from flows.demo_plan import make_plan

    overrides = plan_overrides(args)
    try:
        make_plan(args.quick, overrides)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"sora demo: {e}")
    with quiet_console(os.path.join(os.path.abspath(args.out), "logs"), verbose=args.verbose):
        demo_flow(out=args.out, quick=args.quick, overrides=overrides)
    return 0
