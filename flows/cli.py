"""The `sora` command line: one subcommand per job.

The CLI is the top layer (it may call `sora`, `pipelines` and `flows`), so it lives here.
Each subcommand imports its heavy modules only when it runs, so `sora --help` and
`sora synth` never start Ray.

    sora synth --out data/raw --n 200 --seed 1      # the shapes world: videos + captions.jsonl
    sora --help                                     # every job
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from flows.commands.common import formatter

# Offline by design (docs/setup-notes.md): never reach a model hub; keep Ray's telemetry off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# --------------------------------------------------------------------------- main
# One module per subcommand under flows/commands/, each with `add(subparsers)` (its parser,
# with help and an example) and `run(args)`. `sora --help` lists them in the order of the
# pipeline; a module not named here is still found, and listed after these.
# Modules of flows/commands that are shared helpers, not subcommands.
HELPERS = {"common", "config_args"}
ORDER = ["synth", "ingest", "caption", "train-captioner", "train-vae", "encode", "train", "generate",
         "generate-bulk", "eval", "serve", "demo", "deploy"]


def command_modules() -> list[str]:
    import flows.commands

    found = {m.name for m in pkgutil.iter_modules(flows.commands.__path__)} - HELPERS
    named = [n.replace("-", "_") for n in ORDER]
    return [n for n in named if n in found] + sorted(found - set(named))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `sora` parser. With ``command`` (a subcommand's name), only that subcommand is built:
    building a subcommand imports the config dataclasses its flags come from, which is most of
    the start-up time of a command."""
    parser = argparse.ArgumentParser(
        prog="sora",
        formatter_class=formatter,
        description="The Sora recipe on Ray: raw video in, a text-to-video model out.\n"
        "Runs locally by default; set RAY_ADDRESS / PREFECT_API_URL and use fsspec URLs\n"
        "(s3://, gs://, ...) to run the same commands on a cluster.",
        epilog="run `sora COMMAND --help` for each command's options and an example.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in command_modules():
        if command is None or name == command.replace("-", "_"):
            importlib.import_module(f"flows.commands.{name}").add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    known = {n.replace("_", "-") for n in command_modules()}
    args = build_parser(first if first in known else None).parse_args(argv)
    # a command's models and decoders free large blocks item after item: keep them in the process
    # instead of taking them back from the kernel as fresh pages each time (`sora.process_memory`)
    # and the command's exit skips the collector's last walk over torch's and the models' objects
    from sora.process_memory import freeze_at_exit, keep_model_memory

    keep_model_memory()
    freeze_at_exit()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
