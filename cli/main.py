"""`robustify`: one command-line tool, built on click.

Local engine (no server): finetune, evaluate. The service: serve, worker, migrate, keys, health,
demo. A client of a running server (the Python SDK underneath): models, datasets, jobs,
architectures, webhooks. Option names are the API's field names with dashes
(--threat-model, --delta, --input-size, ...), the same in the local and the client commands.

Why click and not typer: click is already installed (celery and uvicorn depend on it), so the
CLI adds nothing to the install; typer would add typer and rich for the same command tree.
"""
from __future__ import annotations

import sys
from typing import Any

import click

from cli.params import CONTEXT, Failure


def _version() -> str:
    from robustify._version import __version__

    return __version__


class RobustifyGroup(click.Group):
    """Lists the commands in the order they were added, and turns the errors a user can cause
    (the API's problems, an engine error, a bad recipe value) into one line and an exit status."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            failure = translate(exc)
            if failure is None:
                raise
            raise failure from None


def translate(exc: Exception) -> Failure | None:
    """An exception a user can cause, as a Failure (None: a bug, which keeps its traceback)."""
    import pydantic

    import robustify

    if isinstance(exc, robustify.RobustifyError):   # API problems carry "[code, HTTP status]"
        return Failure(exc.message)
    try:
        from core.errors import RobustifyError as EngineError
    except ImportError:  # pragma: no cover - the client commands need no engine
        EngineError = ()  # type: ignore[assignment,misc]
    if EngineError and isinstance(exc, EngineError):
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


def _register() -> None:
    from cli import client, demo, local, reproduce, service

    for command in (local.finetune, local.evaluate, service.serve, service.worker, service.migrate_cmd,
                    service.keys, service.health, demo.demo, client.models, client.datasets, client.jobs,
                    client.architectures, client.webhooks, reproduce.reproduce):
        cli.add_command(command)


_register()


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
