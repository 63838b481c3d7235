"""docs/cli.md from the command tree itself: `python -m cli.docgen > docs/cli.md`.

Every command's help as `robustify … --help` prints it, at a fixed width so that the page does
not depend on the terminal; tests/docs/test_cli_reference.py checks the page is up to date.
"""
from __future__ import annotations

import sys

import click

from cli.main import cli

WIDTH = 100

INTRO = """# CLI reference

`robustify` is one command for everything: the engine on this machine (`finetune`, `evaluate`),
the service (`serve`, `worker`, `migrate`, `keys`, `health`, `demo`) and a client of a running
server (`models`, `datasets`, `jobs`, `architectures`, `webhooks`, on the [Python SDK](sdk.md)).
This page is generated from the CLI itself (`python -m cli.docgen > docs/cli.md`); `robustify
COMMAND --help` prints the same text.

**Names.** Options are the [HTTP API](http-api.md)'s field names with dashes, the same in the local
and the client commands: `--threat-model`, `--delta`, `--input-size`, `--input-mean`,
`--input-std`, `--seed`. A radius may be written as a fraction (`--delta 8/255`,
`--deltas 2/255,8/255,0.1`, `--set pgd_step_ratio=1/8`). The recipe's other fields go through
`--set FIELD=VALUE` (repeatable; VALUE is JSON or a fraction) or `--config` (a JSON object, inline
or `@file.json`); `robustify jobs fields finetune` (or `--set help`) lists them with their types,
defaults and meaning, from the same schema the server checks.

**Client commands** take `--url` (`ROBUSTIFY_URL`), `--key` (`ROBUSTIFY_API_KEY`) and `--json`
(the server's objects as JSON, for scripts). Lists take `--limit`, `--after` (the `last_id` of
the page before) and `--all`.

**Errors** are one line on stderr: an API problem with its code (`… [model_not_ready, HTTP 409]`),
an engine error as `code: message`. The exit status is 0 on success, 1 when the server or the
engine refused or failed (and for `jobs watch` / `--watch`, when the job did not succeed), 2 for
a bad option or value (an unknown recipe field, invalid JSON, a radius that is not a number).

**Progress.** The commands that follow a job (`jobs submit --watch`, `jobs watch`, `demo`, and the
local `finetune` and `evaluate`) take `--progress bar|plain|none` and `--quiet` (`-q`). On a
terminal the default is a bar redrawn in place; when the output is a file, a pipe or a CI log it is
`plain`: one line whenever the phase, the epoch or the status changes, else at most one every 30 s,
each with the time, the percentage, the epoch, the phase and the ETA:

```text
12:04:31  running   37%  epoch 2/8  train  step 40/71  eta 2m 10s  clean 0.912  w2 0.412
```

`--quiet` prints no progress, only the result (and `jobs submit --quiet` only the job's id, for
scripts); with `--json` the progress is off unless `--progress` asks for it, and then goes to stderr.
Every phase of a job reports as it goes (the input model's validation, each training step, each
epoch's validation, every attack of the final evaluation), so the ETA appears after its first step.

**Shell completion** (commands, options and their choices):

```bash
eval "$(_ROBUSTIFY_COMPLETE=bash_source robustify)"    # in ~/.bashrc
eval "$(_ROBUSTIFY_COMPLETE=zsh_source robustify)"     # in ~/.zshrc
_ROBUSTIFY_COMPLETE=fish_source robustify > ~/.config/fish/completions/robustify.fish
```

**Why click.** The CLI is built on [click](https://click.palletsprojects.com/): it is already
installed (celery and uvicorn depend on it), so the command line adds no package; typer, the
other common choice, is built on click and would add typer and rich for the same command tree.
"""


def _help(command: click.Command, path: list[str], parent: click.Context | None) -> tuple[str, click.Context]:
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    ctx = click.Context(command, info_name=path[-1], parent=parent, **settings)
    return command.get_help(ctx), ctx


def _sections(command: click.Command, path: list[str], parent: click.Context | None) -> list[str]:
    text, ctx = _help(command, path, parent)
    level = "#" * min(len(path) + 1, 4)
    out = [f"{level} {' '.join(path)}\n\n```text\n{text.rstrip()}\n```\n"]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                out += _sections(sub, [*path, name], ctx)
    return out


def render() -> str:
    return INTRO + "\n" + "\n".join(_sections(cli, ["robustify"], None))


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
