"""The CLI's progress and its papercuts, without a server: --progress plain|bar|none and --quiet,
lines not frames when the output is not a terminal, `--set help` without the other options, the
close-name hint of a misspelt field, and a cancelled run's epochs."""
from __future__ import annotations

import io
import re
from typing import Any

import click
import pytest

from cli.main import main
from cli.progress import JobProgress, format_eta, plain_line, resolve_mode
from cli.result_table import finetune_table
from core.engine.config import EvaluateConfig, FinetuneConfig


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _job(fraction: float, phase: str, epoch: int, status: str = "running", eta: float | None = 90.0,
         **metrics: float) -> dict[str, Any]:
    return {"id": "job_1", "status": status, "latest_metrics": metrics,
            "progress": {"fraction": fraction, "phase": phase, "epoch": epoch, "total_epochs": 8,
                         "eta_seconds": eta}}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_default_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    assert resolve_mode(None, False, Terminal()) == "bar"
    assert resolve_mode(None, False, io.StringIO()) == "plain"          # a file, a pipe, a CI log
    assert resolve_mode("bar", False, io.StringIO()) == "bar"           # asked for
    assert resolve_mode("plain", True, Terminal()) == "none"            # --quiet wins
    assert resolve_mode(None, False, Terminal(), default="none") == "none"
    assert [format_eta(s) for s in (None, -1, 4.4, 130, 3 * 3600 + 5 * 60)] == ["?", "?", "4s", "2m 10s", "3h 05m"]


def test_plain_progress_is_a_line_per_phase_or_epoch_not_a_frame_per_poll() -> None:
    """A job polled twice a second for an hour of 8 epochs: lines when the phase, epoch or status
    changes, else one every 30 s at most, each with the epoch, the phase and the percentage."""
    now = [0.0]
    out = io.StringIO()
    shown = JobProgress("plain", out, clock=lambda: now[0])
    polls = 0
    for epoch in range(1, 9):
        for phase, share in (("train", 0.8), ("evaluate", 0.2)):
            for k in range(int(450 * share) * 2):                     # 450 s per epoch, a poll every 0.5 s
                fraction = (epoch - 1 + (k / (900 * share)) * share + (0.8 if phase == "evaluate" else 0)) / 9
                shown.update(_job(fraction, phase, epoch, clean_accuracy=0.9, w2_robust_accuracy=0.4))
                now[0] += 0.5
                polls += 1
    shown.update(_job(1.0, "done", 8, status="succeeded", eta=0.0))
    shown.close()
    lines = out.getvalue().splitlines()
    assert polls == 7200 and len(lines) == shown.lines
    assert 16 < len(lines) < 200, len(lines)     # 16 phase changes + one every 30 s + the end; not 7,200 frames
    for line in lines[:-1]:
        assert re.search(r"running\s+\d+%  epoch [1-8]/8  (train|evaluate)  eta 1m 30s  clean 0.900  w2 0.400$",
                         line), line
    assert re.search(r"succeeded\s+100%  epoch 8/8$", lines[-1]), lines[-1]
    percents = [int(re.search(r"(\d+)%", line).group(1)) for line in lines]   # type: ignore[union-attr]
    assert percents == sorted(percents)


def test_a_bar_redraws_in_place_and_none_prints_nothing() -> None:
    out = io.StringIO()
    shown = JobProgress("bar", out)
    for k in range(50):
        shown.update(_job(k / 100, "train", 1))
    shown.write("warning: a batch was halved")
    shown.close()
    text = out.getvalue()
    assert "\r" in text and "warning: a batch was halved" in text and shown.lines == 0
    assert "epoch 1/8" in text and "eta 1m 30s" in text
    silent = io.StringIO()
    none = JobProgress("none", silent)
    none.update(_job(0.5, "train", 1))
    none.write("warning: ignored")
    none.close()
    assert silent.getvalue() == ""
    assert plain_line(_job(0.25, "test: input model: W2 ensemble", 8, eta=None), now="12:00:00") == \
        "12:00:00  running   25%  epoch 8/8  test: input model: W2 ensemble  eta ?"


def test_set_help_lists_the_fields_without_the_other_options(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "jobs", "submit", "--set", "help")
    assert rc == 0, err
    assert all(f"\n  {name}  (" in out for name in FinetuneConfig.model_fields)
    rc, out, _ = run(capsys, "jobs", "submit", "--type", "evaluate", "--set", "help")
    assert rc == 0 and all(f"\n  {name}  (" in out for name in EvaluateConfig.model_fields)
    rc, out, _ = run(capsys, "finetune", "--set", "help")            # the local command needs no --out for it
    assert rc == 0 and "\n  epochs  (" in out
    # without help the options are still required, with click's words and exit status
    rc, _, err = run(capsys, "jobs", "submit", "--dataset", "digits")
    assert rc == 2 and "Missing option '--model'" in err
    rc, _, err = run(capsys, "jobs", "submit", "--model", "mdl_x")
    assert rc == 2 and "Missing option '--dataset'" in err
    rc, _, err = run(capsys, "evaluate", "--model", "m.safetensors")
    assert rc == 2 and "Missing option '--out'" in err
    rc, out, _ = run(capsys, "jobs", "submit", "--help")
    assert "--progress [bar|plain|none]" in out and "--quiet" in out and "[required]" in out


@pytest.mark.parametrize("field, hint", [("epoch", "epochs"), ("betaa", "beta"), ("batchsize", "batch_size")])
def test_a_misspelt_field_gets_the_close_name(capsys: pytest.CaptureFixture[str], field: str, hint: str) -> None:
    rc, _, err = run(capsys, "jobs", "submit", "--model", "m", "--dataset", "digits", "--set", f"{field}=3")
    assert rc == 2 and f"unknown finetune field {field} (did you mean {hint}?)" in err, err
    rc, _, err = run(capsys, "jobs", "submit", "--model", "m", "--dataset", "digits", "--set", "frobnicate=3")
    assert rc == 2 and "unknown finetune field frobnicate;" in err and "did you mean" not in err


def test_a_cancelled_run_says_how_many_epochs_it_trained() -> None:
    config = {"epochs": 4, "batch_size": 96, "lr": 0.01, "beta": 3.0, "seed": 1, "attack_steps": 3}
    stopped = {"type": "finetune", "stopped": True, "verdict": "stopped", "epochs_completed": 1, "best_epoch": 1,
               "before": None, "after": None, "config": config}
    text = finetune_table(stopped)
    assert "STOPPED after epoch 1" in text and "trained 1 of 4 epochs" in text and "trained 4 epochs" not in text
    done = {**stopped, "stopped": False, "verdict": "improved", "improved": True, "epochs_completed": 4}
    assert "trained 4 epochs," in finetune_table(done)


def test_progress_and_quiet_are_on_every_command_that_follows_a_job() -> None:
    from cli.main import cli

    ctx = click.Context(cli)
    jobs = cli.get_command(ctx, "jobs")
    commands = [jobs.commands["submit"], jobs.commands["watch"],    # type: ignore[union-attr]
                cli.get_command(ctx, "demo"), cli.get_command(ctx, "finetune"), cli.get_command(ctx, "evaluate")]
    for command in commands:
        opts = {o for p in command.params for o in p.opts}           # type: ignore[union-attr]
        assert {"--progress", "--quiet", "-q"} <= opts, command.name
