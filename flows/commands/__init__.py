"""One module per `sora` subcommand: `add(subparsers)` and `run(args)`."""
