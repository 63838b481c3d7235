"""`robustify`: one command-line tool, built on click.

Local engine (no server): finetune, evaluate. The service: serve, worker, migrate, keys, health,
demo. A client of a running server (the Python SDK underneath): models, datasets, jobs,
architectures, webhooks. Option names are the API's field names with dashes
(--threat-model, --delta, --input-size, ...), the same in the local and the client commands.

Why click and not typer: click is already installed (celery and uvicorn depend on it), so the
CLI adds nothing to the install; typer would add typer and rich for the same command tree.

Commands load when they are used: `pip install robustify` (the SDK, no torch and no web stack)
runs the client commands and `health api`; the others need `pip install "robustify[server]"`
and, without it, say so in one line instead of a traceback.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from cli.params import CONTEXT, Failure

# Each command's module, in the order `robustify --help` lists them. A module is imported only when
# its command runs (or help lists it), so `robustify jobs get` imports neither torch nor the service.
COMMANDS = {
    "finetune": "cli.local:finetune",
    "evaluate": "cli.local:evaluate",
    "serve": "cli.service:serve",
    "worker": "cli.service:worker",
    "migrate": "cli.service:migrate_cmd",
    "keys": "cli.service:keys",
    "health": "cli.service:health",
    "demo": "cli.demo:demo",
    "models": "cli.client:models",
    "datasets": "cli.client:datasets",
    "jobs": "cli.client:jobs",
    "sweep": "cli.sweep:sweep",
    "architectures": "cli.client:architectures",
    "webhooks": "cli.client:webhooks",
    "reproduce": "cli.reproduce:reproduce",
}
# the packages of this distribution: a missing module outside them is a dependency not installed
OWN_PACKAGES = frozenset({"api", "cli", "core", "migrations", "robustify", "worker"})
SERVER_EXTRA = 'pip install "robustify[server]"'


def _version() -> str:
    from robustify._version import __version__

    return __version__


def missing_dependency(exc: BaseException) -> str | None:
    """The third-party module whose absence raised `exc` (None when it is not that: a bug keeps its
    traceback, and so does a module of robustify's own that is missing)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.partition(".")[0]
    return None if top in OWN_PACKAGES else top


def server_extra_missing(command: str, module: str) -> Failure:
    return Failure(f"`robustify {command}` needs the service and the engine, which this install lacks "
                   f"(no module {module!r}): {SERVER_EXTRA}", code="server_extra_missing")


def unavailable_command(name: str, module: str) -> click.Command:
    """Stands in for a command whose module needs the server extra: its help says so, and running it
    (with any arguments) fails with one line naming the install command."""
    def run(args: tuple[str, ...]) -> None:
        raise server_extra_missing(name, module)

    return click.Command(
        name, callback=run, params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
        help=f"Needs the service and the engine: {SERVER_EXTRA}.", short_help=f"(needs {SERVER_EXTRA})",
        context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_extra_args": True})


class RobustifyGroup(click.Group):
    """Loads each command from its module on first use (COMMANDS), lists them in that order, and
    turns the errors a user can cause (the API's problems, an engine error, a bad recipe value, a
    missing server extra) into one line and an exit status."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(dict.fromkeys([*COMMANDS, *self.commands]))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMANDS:
            self.add_command(load_command(name), name)
        return self.commands.get(name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            failure = translate(exc, ctx.invoked_subcommand or "")
            if failure is None:
                raise
            raise failure from None


def load_command(name: str) -> click.Command:
    """The command `name` from its module; a stand-in when the module needs what is not installed."""
    module, _, attribute = COMMANDS[name].partition(":")
    try:
        command: click.Command = getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError as exc:
        missing = missing_dependency(exc)
        if missing is None:
            raise
        return unavailable_command(name, missing)
    return command


def translate(exc: Exception, command: str = "") -> Failure | None:
    """An exception a user can cause, as a Failure (None: a bug, which keeps its traceback)."""
    import pydantic

    import robustify

    if isinstance(exc, robustify.RobustifyError):   # API problems carry "[code, HTTP status]"
        return Failure(exc.message)
    missing = missing_dependency(exc)
    if missing is not None:   # e.g. `health worker` (needs the database driver) in a client-only install
        return server_extra_missing(command, missing)
    try:
        from core.errors import RobustifyError as EngineError
    except ModuleNotFoundError:  # pragma: no cover - core.errors needs only the standard library
        return None
    if isinstance(exc, EngineError):
        return Failure(exc.message, code=exc.code)
    if isinstance(exc, pydantic.ValidationError):
        lines = [f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()]
        return Failure("; ".join(lines), code="validation_error", exit_code=2)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return Failure(str(exc), code="file_error", exit_code=2)
    if isinstance(exc, KeyboardInterrupt):
        return Failure("interrupted", exit_code=130)
    return None


@click.group(cls=RobustifyGroup, context_settings=CONTEXT)
@click.version_option(version=_version(), prog_name="robustify", message="%(prog)s %(version)s")
def cli() -> None:
    """Make image classifiers robust to distribution shift: W-TRADES fine-tuning and W2 /
    l-infinity robustness evaluation, on this machine or as a service.

    \b
    Shell completion (bash; zsh and fish alike):
      eval "$(_ROBUSTIFY_COMPLETE=bash_source robustify)"
    """


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default sys.argv[1:]) and return its exit status (for tests and
    `python -m cli`; the `robustify` script calls it with no arguments)."""
    try:
        result = cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="robustify",
                          standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("robustify: interrupted", err=True)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
