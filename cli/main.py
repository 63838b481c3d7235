"""Entry point of `robustify`; dispatches to the module that owns each subcommand."""
from __future__ import annotations

import importlib
import sys

# subcommand -> module with `add_parser(subparsers)` registering it and a `run(args)` it sets
COMMANDS: dict[str, str] = {
    "finetune": "cli.local",
    "evaluate": "cli.local",
    "serve": "cli.service",
    "worker": "cli.service",
    "migrate": "cli.service",
    "keys": "cli.service",
    "health": "cli.service",
    "demo": "cli.demo",
    "reproduce": "cli.reproduce",
    "models": "cli.client",
    "datasets": "cli.client",
    "jobs": "cli.client",
    "architectures": "cli.client",
}

USAGE = """usage: robustify <command> [options]

Local engine (no server):
  finetune     W-TRADES fine-tuning of a model, writes checkpoint, report.json and plot
  evaluate     clean / W2 / l-inf robust accuracy of a model, writes report.json and plot
Service:
  serve        run the API and one worker (embedded default: SQLite + server-less broker)
  worker       run a GPU worker against ROBUSTIFY_DATABASE_URL and ROBUSTIFY_BROKER_URL
  migrate      apply database migrations (alembic upgrade head)
  keys         manage API keys (keys create NAME)
  health       api | worker: exit 0 when healthy (container health checks)
  demo         start the embedded service, fine-tune on digits over HTTP, show the result
  reproduce    the 2025 paper's table: RobustBench CIFAR-10 models before/after W-TRADES, ours vs the paper's
Client of a running server (--url, --key or ROBUSTIFY_URL, ROBUSTIFY_API_KEY):
  models       add | hub | upload | list
  datasets     upload | list   (.npz, or a .zip / .tar of class folders)
  jobs         submit | status | watch | cancel | download
  architectures list [--family timm --q resnet]

Run `robustify <command> --help` for the options of one command."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"robustify: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
