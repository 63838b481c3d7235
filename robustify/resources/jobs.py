"""client.jobs: submit, get, list, cancel, events (paged or streamed), wait, checkpoints, downloads."""
from __future__ import annotations

import builtins
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from robustify.errors import APIConnectionError, NotFoundError, WaitTimeoutError
from robustify.pagination import Page
from robustify.radius import parse_radius
from robustify.resources import Resource
from robustify.types import Checkpoint, Event, Job, Model, WebhookDelivery


@dataclass
class Downloads:
    """Where jobs.download saved each file (None: the job has none, e.g. not finished yet)."""

    checkpoint: Path | None
    report: Path | None
    plot: Path | None


def _threat_model(spec: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    out = dict(spec)
    if out.get("delta") is not None:
        out["delta"] = parse_radius(out["delta"])  # "8/255" works as well as 0.0314
    return out


class Jobs(Resource):
    def create(self, *, type: Literal["finetune", "evaluate", "sweep"], dataset: str, model_id: str | None = None,
               robustbench: str | Mapping[str, Any] | None = None, threat_model: Mapping[str, Any] | None = None,
               config: Mapping[str, Any] | None = None, seed: int | None = None,
               metadata: Mapping[str, Any] | None = None, webhook: str | Mapping[str, Any] | None = None,
               idempotency_key: str | None = None, sweep: Mapping[str, Any] | None = None,
               recommend: Mapping[str, Any] | None = None) -> Job:
        """Submit a job. Give `model_id`, or `robustbench` (a zoo name, or {"name", "dataset",
        "threat_model"}). `webhook`: a URL, or {"url", "events": ["job.succeeded", …]}. A sweep
        (type "sweep") takes `sweep` ({"delta": [...], "beta": [...], "attack_schedule": [...]}; δ
        values may be "8/255") and `recommend` ({"maximize": "w2", "max_clean_drop": 0.03}).

        An Idempotency-Key (generated when not given) makes the automatic retries safe: a repeat
        returns the job the first attempt created."""
        body: dict[str, Any] = {"type": type, "dataset": dataset, "config": dict(config or {})}
        if sweep is not None:
            values = dict(sweep)
            if values.get("delta") is not None:
                values["delta"] = [parse_radius(d) for d in values["delta"]]
            body["sweep"] = values
        if recommend is not None:
            body["recommend"] = dict(recommend)
        if model_id is not None:
            body["model_id"] = model_id
        if robustbench is not None:
            ref = {"name": robustbench} if isinstance(robustbench, str) else dict(robustbench)
            body["model"] = {"robustbench": ref}
        if threat_model is not None:
            body["threat_model"] = _threat_model(threat_model)
        if seed is not None:
            body["seed"] = seed
        if metadata is not None:
            body["metadata"] = dict(metadata)
        if webhook is not None:
            body["webhook"] = {"url": webhook} if isinstance(webhook, str) else dict(webhook)
        headers = {"Idempotency-Key": idempotency_key or f"sdk-{uuid.uuid4().hex}"}
        return Job.model_validate(self._t.json("POST", "/v1/jobs", json=body, headers=headers, repeatable=True))

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._t.json("GET", f"/v1/jobs/{job_id}"))

    def list(self, *, status: str | list[str] | None = None, type: str | None = None, model_id: str | None = None,
             parent_job_id: str | None = None, limit: int = 100, after: str | None = None) -> Page[Job]:
        """Newest first; iterate the page to walk them all. `status` may list several;
        `parent_job_id` lists a sweep's fine-tunes."""
        if isinstance(status, list):
            status = ",".join(status)
        return self._page(Job, "/v1/jobs", {"status": status, "type": type, "model_id": model_id,
                                            "parent_job_id": parent_job_id, "limit": limit, "after": after})

    def sweep(self, *, dataset: str, model_id: str, delta: Sequence[float | str],
              beta: Sequence[float] | None = None, attack_schedule: Sequence[str] | None = None,
              maximize: str = "w2", max_clean_drop: float | None = 0.03, threat_model: Mapping[str, Any] | None = None,
              config: Mapping[str, Any] | None = None, **more: Any) -> Job:
        """Fine-tune `model_id` once per value of δ (times each β or schedule given): a sweep job whose
        result, once every child has ended, is the frontier and the child recommended by the rule
        "the highest `maximize` whose clean accuracy dropped by at most `max_clean_drop`"."""
        values: dict[str, Any] = {"delta": list(delta)}
        if beta is not None:
            values["beta"] = list(beta)
        if attack_schedule is not None:
            values["attack_schedule"] = list(attack_schedule)
        return self.create(type="sweep", dataset=dataset, model_id=model_id, threat_model=threat_model,
                           config=config, sweep=values,
                           recommend={"maximize": maximize, "max_clean_drop": max_clean_drop}, **more)

    def children(self, sweep_id: str) -> builtins.list[Job]:
        """A sweep's fine-tunes, in the order of its values."""
        return sorted(self.list(parent_job_id=sweep_id), key=lambda j: (j.created_at is None, j.created_at))

    def promote(self, job_id: str) -> Model:
        """The model of a succeeded fine-tune's best checkpoint (a sweep's child, say), registered
        now if it has none (POST /v1/jobs/{id}/promote)."""
        return Model.model_validate(self._t.json("POST", f"/v1/jobs/{job_id}/promote", repeatable=True))

    def cancel(self, job_id: str) -> Job:
        """Idempotent: a queued job is cancelled at once, a running one becomes `cancelling`."""
        return Job.model_validate(self._t.json("POST", f"/v1/jobs/{job_id}/cancel", repeatable=True))

    # ------------------------------------------------------------------ events
    def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> Page[Event]:
        """The events recorded so far, oldest first (iterate for all of them)."""
        return self._page(Event, f"/v1/jobs/{job_id}/events", {"after": after, "limit": limit})

    def stream(self, job_id: str, *, after: int = 0) -> Iterator[Event]:
        """Follow the job's events live (Server-Sent Events) until the job ends. A broken
        connection is resumed where it stopped (Last-Event-ID), within the retry budget."""
        last, failures = after, 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = str(last)
            try:
                with self._t.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                    timeout=httpx.Timeout(30.0, read=120.0)) as response:
                    for event in _server_sent_events(response.iter_lines()):
                        last, failures = event.id, 0
                        yield event
                return  # the server closes the stream once the job is final
            except (httpx.TransportError, APIConnectionError):
                failures += 1
                if failures > self._t.max_retries:
                    raise
                time.sleep(self._t._delay(failures - 1, None))

    def wait(self, job_id: str, *, timeout: float | None = None, poll_interval: float = 2.0,
             on_update: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job is succeeded, failed or cancelled, and return it (check `.status`).
        `on_update` sees every poll; WaitTimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job.done:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"job {job_id} is still {job.status} after {timeout:g} s", last=job)
            time.sleep(poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - time.monotonic())))

    # ------------------------------------------------------------------ results
    def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:  # `list` here is Jobs.list
        body = self._t.json("GET", f"/v1/jobs/{job_id}/checkpoints")
        return [Checkpoint.model_validate(c) for c in body.get("data", [])]

    def report(self, job_id: str) -> dict[str, Any]:
        """The job's report (JSON): before/after metrics of a fine-tune, the curves of an evaluation."""
        report: dict[str, Any] = self._t.json("GET", f"/v1/jobs/{job_id}/report")
        return report

    def webhook_deliveries(self, job_id: str) -> builtins.list[WebhookDelivery]:
        body = self._t.json("GET", f"/v1/jobs/{job_id}/webhook-deliveries")
        return [WebhookDelivery.model_validate(d) for d in body.get("data", [])]

    def download(self, job_id: str, to: str | Path | None = None, *, epoch: int | None = None,
                 report: bool = True, plot: bool = True) -> Downloads:
        """Save the best checkpoint (or the one of `epoch`), report.json and report.png into the
        folder `to` (default: the job id). Every file is sha256-verified."""
        out = Path(to or job_id)
        out.mkdir(parents=True, exist_ok=True)
        if epoch is None:
            checkpoint = self._t.download(f"/v1/jobs/{job_id}/checkpoint", out, default_name="checkpoint.safetensors",
                                          missing_ok=True)
        else:
            matches = [c for c in self.checkpoints(job_id) if c.epoch == epoch]
            if not matches:
                raise NotFoundError(404, {"code": "not_found",
                                          "detail": f"job {job_id} has no checkpoint of epoch {epoch}; "
                                                    "list them with client.jobs.checkpoints()."})
            ckpt = matches[-1]
            checkpoint = self._t.download(f"/v1/jobs/{job_id}/checkpoints/{ckpt.id}/content", out,
                                          default_name=ckpt.filename or f"epoch{epoch}.safetensors",
                                          expected_sha256=ckpt.sha256)
        return Downloads(
            checkpoint=checkpoint,
            report=self._t.download(f"/v1/jobs/{job_id}/report", out, default_name="report.json",
                                    missing_ok=True) if report else None,
            plot=self._t.download(f"/v1/jobs/{job_id}/report.png", out, default_name="report.png",
                                  missing_ok=True) if plot else None,
        )


def _server_sent_events(lines: Iterator[str]) -> Iterator[Event]:
    """Events of a text/event-stream: `id:`/`event:`/`data:` fields, a blank line ends one."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                yield Event.model_validate(json.loads(fields["data"]))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
