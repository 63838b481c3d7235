"""docs/cli.md is the CLI's own help, regenerated: a command or option changed without
`python -m cli.docgen > docs/cli.md` fails here."""
from __future__ import annotations

import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cli_reference_is_up_to_date() -> None:
    from cli.docgen import render

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # e.g. click's warning about two parameters of one name
        page = render()
    assert (ROOT / "docs" / "cli.md").read_text() == page, \
        "docs/cli.md is out of date: run `python -m cli.docgen > docs/cli.md`"
    for command in ("robustify jobs submit", "robustify finetune", "robustify models upload",
                    "robustify webhooks list"):
        assert f" {command}\n" in page, command
    assert "--threat-model [w2-linf|w2-l2|linf|l2]" in page and "_ROBUSTIFY_COMPLETE=bash_source" in page
