"""The click CLI itself, without a server: every command and option explained, --version, shell
completion, radii written as fractions, --set checked against the recipe schema, one-line errors
with exit status 1 or 2, and the passthrough to `cli.reproduce`."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest

from cli.main import cli, main
from core.engine.config import EvaluateConfig, FinetuneConfig

ROOT = Path(__file__).resolve().parents[2]


def _walk(command: click.Command, path: str = "robustify") -> list[tuple[str, click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):   # the top group loads its commands on first use
            found += _walk(command.get_command(ctx, name), f"{path} {name}")
    return found


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"   # closed again: nothing listens there


def test_every_command_and_option_is_explained() -> None:
    commands = _walk(cli)
    assert len(commands) >= 40
    names = {path for path, _ in commands}
    for resource in ("models upload", "models add", "models hub", "models get", "models list", "models delete",
                     "datasets upload", "datasets get", "datasets list", "datasets delete", "jobs submit",
                     "jobs get", "jobs list", "jobs cancel", "jobs events", "jobs watch", "jobs checkpoints",
                     "jobs download", "architectures list", "webhooks create", "webhooks list", "webhooks delete",
                     "keys create", "finetune", "evaluate", "serve", "demo", "reproduce"):
        assert f"robustify {resource}" in names, resource
    for path, command in commands:
        if command.hidden:
            continue
        assert (command.help or "").strip(), f"{path} has no help"
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert (param.help or "").strip(), f"{path} {param.opts[0]} has no help"
    # finetune-only and evaluate-only options stay on their own command
    ctx = click.Context(cli)
    finetune, evaluate = cli.get_command(ctx, "finetune"), cli.get_command(ctx, "evaluate")
    assert "--pretrain" in {o for p in finetune.params for o in p.opts}
    assert "--pretrain" not in {o for p in evaluate.params for o in p.opts}
    assert "--deltas" in {o for p in evaluate.params for o in p.opts}
    # one naming scheme: the local and the client commands share the API's field names
    submit = cli.get_command(ctx, "jobs").commands["submit"]  # type: ignore[union-attr]
    for option in ("--threat-model", "--delta", "--seed", "--config", "--set", "--deltas"):
        assert option in {o for p in finetune.params + evaluate.params for o in p.opts} | set(), option
        assert option in {o for p in submit.params for o in p.opts}, option


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    from robustify import __version__

    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.strip() == f"robustify {__version__}"
    rc, out, _ = run(capsys, "evaluate", "--help")
    assert rc == 0 and "Clean, W2 and l-inf robust accuracy" in out and "--pretrain" not in out
    rc, out, _ = run(capsys, "jobs", "download", "--help")
    assert rc == 0 and "--epoch" in out and "--url" in out and "--json" in out


def test_recipe_fields_come_from_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "jobs", "fields", "finetune")
    assert rc == 0
    for name in FinetuneConfig.model_fields:
        assert f"\n  {name}  (" in out, name
    assert 'validation_examples  (int ≥ 1' in out and "default 1000" in out
    assert "Share of the training images held out" in out   # the field's description
    rc, out, _ = run(capsys, "evaluate", "--out", "unused", "--set", "help")
    assert rc == 0 and all(f"\n  {name}  (" in out for name in EvaluateConfig.model_fields)


def test_fractions_and_set_values_build_the_recipe() -> None:
    from cli.local import _config, namespace

    args = namespace("evaluate", ["--out", "o", "--threat-model", "w2-l2", "--delta", "8/255", "--deltas",
                                  "2/255,0.1", "--set", "wpgd_steps=7", "--set", "pgd_step_ratio=1/4",
                                  "--config", '{"n_examples": 50, "wpgd_steps": 3}', "--attacks", "pgd"])
    cfg = _config(args, EvaluateConfig)
    assert cfg.threat_model.kind == "w2-l2" and cfg.threat_model.delta == pytest.approx(8 / 255)
    assert cfg.deltas == [pytest.approx(2 / 255), 0.1]
    assert (cfg.wpgd_steps, cfg.n_examples, cfg.pgd_step_ratio, cfg.linf_attacks) == (7, 50, 0.25, ["pgd"])


@pytest.mark.parametrize("argv, code, needle", [
    (["jobs", "submit", "--model", "m", "--dataset", "digits", "--config", "{bad"], 2, "not valid JSON"),
    (["jobs", "submit", "--model", "m", "--dataset", "digits", "--config", "[1]"], 2, "must be a JSON object"),
    (["jobs", "submit", "--model", "m", "--dataset", "digits", "--set", "epoch=3"], 2, "unknown finetune field epoch"),
    (["jobs", "submit", "--model", "m", "--dataset", "digits", "--set", "epochs"], 2, "expected FIELD=VALUE"),
    (["jobs", "submit", "--model", "m", "--dataset", "digits", "--delta", "8/0"], 2, "not a radius"),
    (["finetune", "--out", "o", "--delta", "-1"], 2, "cannot be negative"),
    (["models", "upload", "missing.safetensors", "--architecture", "small-cnn", "--num-classes", "10",
      "--dataset", "digits"], 2, "no such file"),
    (["finetune", "--out", "o", "--set", "epochs=0", "--pretrain", "1"], 2, "validation_error: epochs"),
])
def test_bad_input_is_one_clear_line(capsys: pytest.CaptureFixture[str], argv: list[str], code: int,
                                     needle: str) -> None:
    rc, _, err = run(capsys, *argv)
    assert rc == code and needle in err, err
    assert "Traceback" not in err


def test_an_unreachable_server_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "jobs", "list", "--url", _refused_url())
    assert rc == 1 and "cannot reach the server" in err and len(err.strip().splitlines()) == 1, err


def test_reproduce_is_a_command_with_its_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "reproduce", "--help")
    assert rc == 0 and "2025 paper" in out
    assert all(option in out for option in ("--data-dir", "--model-dir", "--models", "--skip-finetune", "--quick"))
    rc, _, err = run(capsys, "reproduce", "--epochs", "many")
    assert rc == 2 and "'many' is not a valid integer" in err and "Traceback" not in err


def test_shell_completion_names_commands_and_options() -> None:
    env = {**os.environ, "_ROBUSTIFY_COMPLETE": "bash_complete", "COMP_WORDS": "robustify jobs su",
           "COMP_CWORD": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "cli"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "plain,submit" in proc.stdout.splitlines(), proc.stdout + proc.stderr
    env.update(COMP_WORDS="robustify finetune --threat-model ", COMP_CWORD="3")
    proc = subprocess.run([sys.executable, "-m", "cli"], env=env, capture_output=True, text=True, timeout=60)
    assert {"plain,w2-linf", "plain,w2-l2", "plain,linf", "plain,l2"} <= set(proc.stdout.splitlines())
    env.update(_ROBUSTIFY_COMPLETE="bash_source")
    proc = subprocess.run([sys.executable, "-m", "cli"], env=env, capture_output=True, text=True, timeout=60)
    assert "_robustify_completion" in proc.stdout and "complete " in proc.stdout
