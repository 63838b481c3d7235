"""The job vocabulary: its types and the states of its life, spelled here once.

A job is `queued`, then `running` on a worker (`cancelling` once a cancel was asked for and
the worker has not yet stopped), and ends `succeeded`, `failed` or `cancelled`. The API's
schema, the worker's claim and sweep, the CLI and the SDK all take these names from here (the
SDK, which installs without the server, keeps a copy that a test compares with this one).
A `sweep` runs no recipe itself: it is `running` from its submit while its fine-tune children run
on workers, and ends once every child has ended (worker/sweepjob.py).
It imports nothing, so every layer may import it.
"""
from __future__ import annotations

from typing import Final, Literal, get_args

JobType = Literal["finetune", "evaluate", "sweep"]
JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]

JOB_TYPES: Final[tuple[JobType, ...]] = get_args(JobType)
# Job types that start child jobs instead of running a recipe on a worker.
PARENT_TYPES: Final[frozenset[JobType]] = frozenset({"sweep"})
# In the order of a job's life (the API's schema lists them so).
JOB_STATES: Final[tuple[JobStatus, ...]] = get_args(JobStatus)
# A job in one of these states never changes again.
TERMINAL_STATES: Final[frozenset[JobStatus]] = frozenset({"succeeded", "failed", "cancelled"})
# A worker owns the job (its heartbeat counts; the claim of another worker waits for it to go stale).
WORKER_STATES: Final[frozenset[JobStatus]] = frozenset({"running", "cancelling"})
# Not finished yet: the recovery sweep looks after these.
LIVE_STATES: Final[frozenset[JobStatus]] = frozenset(JOB_STATES) - TERMINAL_STATES
