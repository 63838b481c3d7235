"""How the commands that follow a job show its progress (`jobs submit --watch`, `jobs watch`, `demo`,
and the local `finetune` / `evaluate`).

`--progress bar` draws a tqdm bar, redrawn in place: for a terminal. `--progress plain` prints one
line whenever the phase, the epoch or the status changes, and otherwise at most one line every
`PLAIN_INTERVAL` seconds (when the percentage moved): for logs, CI and `> file`. `--progress none`
prints no progress. The default is `bar` when the progress goes to a terminal and `plain`
otherwise, as pip, docker and cargo do. `--quiet` (`-q`) means no progress and only the final
result (or the ids).

A plain line reads

    12:04:31  running  37%  epoch 2/8  train  step 40/71  eta 2m 10s  clean 0.912  w2 0.412
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

import click

PROGRESS_MODES = ("bar", "plain", "none")
PLAIN_INTERVAL = 30.0     # seconds between two plain lines while the phase, epoch and status stay the same
BAR_REDRAW = 0.2          # seconds between two redraws of the bar while they stay the same
_SHOWN = (("clean_accuracy", "clean"), ("w2_robust_accuracy", "w2"), ("linf_robust_accuracy", "linf"),
          ("l2_robust_accuracy", "l2"), ("train_loss", "loss"))


def progress_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--progress and --quiet/-q, the same on every command that follows a job."""
    f = click.option("--quiet", "-q", is_flag=True,
                     help="No progress: print only the final result (and the ids).")(f)
    return click.option("--progress", "progress_mode", type=click.Choice(PROGRESS_MODES),
                        help="How to show progress: bar (redrawn in place), plain (a line per phase or "
                             f"epoch, or every {PLAIN_INTERVAL:.0f} s, for logs) or none. Default: bar on a "
                             "terminal, plain otherwise.")(f)


def resolve_mode(progress_mode: str | None, quiet: bool, stream: IO[str], default: str | None = None) -> str:
    """The mode to use: none when quiet; the one asked for; else `default`, else bar when `stream`
    is a terminal and plain when it is not (a file, a pipe, a CI log)."""
    if quiet:
        return "none"
    if progress_mode:
        return progress_mode
    if default:
        return default
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "plain"


def format_eta(seconds: Any) -> str:
    """An ETA as people read it: "45s", "2m 10s", "1h 05m"; "?" when there is none yet."""
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _where(job: dict[str, Any]) -> list[str]:
    """Epoch, phase and step of a job's progress, as words."""
    p = job.get("progress") or {}
    parts = []
    if p.get("epoch") is not None and p.get("total_epochs"):
        parts.append(f"epoch {p['epoch']}/{p['total_epochs']}")
    if p.get("phase") and job.get("status") == "running":
        parts.append(str(p["phase"]))
    if p.get("step") is not None and p.get("total_steps") and p.get("phase") == "train":
        parts.append(f"step {p['step']}/{p['total_steps']}")
    return parts


def _metrics(job: dict[str, Any]) -> list[str]:
    latest = job.get("latest_metrics") or {}
    return [f"{short} {latest[key]:.3f}" for key, short in _SHOWN if isinstance(latest.get(key), (int, float))]


def percent(job: dict[str, Any]) -> int:
    fraction = (job.get("progress") or {}).get("fraction")
    return int(100 * min(max(float(fraction), 0.0), 1.0)) if isinstance(fraction, (int, float)) else 0


def plain_line(job: dict[str, Any], now: str | None = None) -> str:
    """One line of a job's state: time, status, percentage, epoch, phase, step, ETA, latest numbers."""
    p = job.get("progress") or {}
    parts = [now or time.strftime("%H:%M:%S"), str(job.get("status")), f"{percent(job):3d}%", *_where(job)]
    if job.get("status") == "running":
        parts.append(f"eta {format_eta(p.get('eta_seconds'))}")
    return "  ".join(parts + _metrics(job))


class JobProgress:
    """Shows a job's progress from the job objects a command reads (the API's JSON, as dicts):
    `update(job)` after every read, `write(text)` for a warning, `close()` at the end."""

    def __init__(self, mode: str, stream: IO[str] | None = None, *, interval: float = PLAIN_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode {mode!r}: one of {', '.join(PROGRESS_MODES)}")
        self.mode, self.stream = mode, stream if stream is not None else sys.stdout
        self.interval, self.clock = interval, clock
        self.lines = 0                                      # plain lines printed
        self._key: tuple[Any, ...] | None = None
        self._shown_at = 0.0
        self._shown_percent = -1
        self._bar: Any = None
        self._last: dict[str, Any] | None = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=100, unit="%", file=self.stream,
                             bar_format="{desc:<16} {percentage:3.0f}%|{bar}| {elapsed} {postfix}")

    def update(self, job: dict[str, Any]) -> None:
        self._last = job
        if self.mode == "plain":
            self._plain(job)
        elif self._bar is not None:
            self._draw(job)

    def _plain(self, job: dict[str, Any]) -> None:
        p = job.get("progress") or {}
        key = (job.get("status"), p.get("phase") if job.get("status") == "running" else None, p.get("epoch"))
        now, pct = self.clock(), percent(job)
        due = now - self._shown_at >= self.interval and pct != self._shown_percent
        if key != self._key or due:
            self._print(plain_line(job))
            self._key, self._shown_at, self._shown_percent = key, now, pct

    def _draw(self, job: dict[str, Any], force: bool = False) -> None:
        p = job.get("progress") or {}
        key, now = (job.get("status"), p.get("phase"), p.get("epoch")), self.clock()
        if key == self._key and now - self._shown_at < BAR_REDRAW and not force:
            return          # a recipe reports every step: redraw a few times a second at most
        self._key, self._shown_at = key, now
        bar = self._bar
        bar.n = min(100.0, round(100 * float((job.get("progress") or {}).get("fraction") or 0.0), 1))
        phase = (job.get("progress") or {}).get("phase")
        bar.set_description_str(str(job.get("status")) + (f" {phase}" if phase and job.get("status") == "running"
                                                          else ""))
        where = [w for w in _where(job) if w.startswith("epoch")]
        seconds = (job.get("progress") or {}).get("eta_seconds")
        eta = [f"eta {format_eta(seconds)}"] if job.get("status") == "running" else []
        bar.set_postfix_str("  ".join(where + eta + _metrics(job)), refresh=False)
        bar.refresh()

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self.lines += 1

    def write(self, text: str) -> None:
        """A line such as a warning: above the bar, as its own line in plain mode, nothing in none."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        elif self.mode == "plain":
            self._print(text)

    def close(self) -> None:
        if self._bar is not None:
            if self._last is not None:
                self._draw(self._last, force=True)     # the last state, even if it came within a redraw
            self._bar.close()
            self._bar = None
