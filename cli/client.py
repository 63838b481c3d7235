"""`robustify models|datasets|jobs|architectures|webhooks …`: a client of a running server, on
the Python SDK (`robustify.Client`).

Every command takes --url (or ROBUSTIFY_URL, default http://127.0.0.1:8000), --key (or
ROBUSTIFY_API_KEY) and --json (print the server's objects as JSON, for scripts). A problem
answer prints one line with its code and exits with status 1; a bad option exits with 2.
"""
from __future__ import annotations

import functools
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from cli.params import (
    CONTEXT,
    RECIPES,
    THREAT_KINDS,
    Failure,
    JsonObject,
    Numbers,
    Radius,
    fields_help,
    recipe_fields,
    require,
)
from cli.progress import JobProgress, format_eta, progress_options, resolve_mode
from robustify import Client
from robustify.client import DEFAULT_URL
from robustify.types import JOB_STATES, TERMINAL_STATUSES, JobType

BUILTIN_DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100")


# ------------------------------------------------------------------------------ plumbing
class Out:
    """The SDK client of one command, and how it prints."""

    def __init__(self, client: Client, as_json: bool) -> None:
        self.client, self.json = client, as_json

    def dump(self, obj: Any) -> None:
        click.echo(json.dumps(_plain(obj), indent=2))


def _plain(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", by_alias=True)
    if isinstance(obj, list):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def client_command(group: click.Group, name: str, *, retries: int = 3, **kw: Any) -> Callable[[Any], Any]:
    """A command of `group` with --url, --key and --json; the function gets an `Out` first."""
    def decorate(f: Callable[..., Any]) -> click.Command:
        @functools.wraps(f)
        def run(url: str, key: str | None, as_json: bool, **options: Any) -> int:
            with Client(url, api_key=key or "", max_retries=retries) as client:
                return int(f(Out(client, as_json), **options) or 0)

        for option in reversed(CLIENT_OPTIONS):
            run = option(run)
        return group.command(name, context_settings=CONTEXT, **kw)(run)

    return decorate


CLIENT_OPTIONS = [
    click.option("--url", envvar="ROBUSTIFY_URL", default=DEFAULT_URL, show_default=True,
                 help="The server (env ROBUSTIFY_URL)."),
    click.option("--key", envvar="ROBUSTIFY_API_KEY", help="An API key rk_… (env ROBUSTIFY_API_KEY)."),
    click.option("--json", "as_json", is_flag=True, help="Print the server's JSON objects (for scripts)."),
]


def paging(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True, help="Items per page."),
        click.option("--after", metavar="ID", help="The last id of the page before (its `last_id`)."),
        click.option("--all", "all_pages", is_flag=True, help="Every page, not just one."),
    ]):
        f = option(f)
    return f


def show_page(out: Out, page: Any, all_pages: bool, line: Callable[[dict[str, Any]], str]) -> int:
    items = list(page) if all_pages else list(page.data)
    more = False if all_pages else page.has_more
    last = (items[-1].id if items else None) if all_pages else page.last_id
    if out.json:
        click.echo(json.dumps({"data": _plain(items), "has_more": more, "last_id": last}, indent=2))
        return 0
    for item in items:
        click.echo(line(_plain(item)))
    if more:
        click.echo(f"(more: --after {last}, or --all)", err=True)
    return 0


def _file(path: Path) -> Path:
    if not path.is_file():
        raise click.BadParameter(f"no such file: {path}", param_hint="FILE")
    return path


# ------------------------------------------------------------------------------ models
@click.group(context_settings=CONTEXT)
def models() -> None:
    """Register, list, inspect and delete models on the server."""


def _wait_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--wait-timeout", type=float, default=600.0, show_default=True,
                     help="Seconds --wait waits at most.")(f)
    return click.option("--wait", is_flag=True, help="Wait until the server has validated the model "
                                                     "(exit 1 if it is rejected).")(f)


def _input_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--input-size", "--input-shape", "input_size", type=Numbers("int"),
                     help="C,H,W the model takes, e.g. 3,224,224 (default: the data set's)."),
        click.option("--input-mean", "--mean", "input_mean", type=Numbers("float"),
                     help="Per-channel mean of the normalisation it was trained with, e.g. 0.485,0.456,0.406."),
        click.option("--input-std", "--std", "input_std", type=Numbers("float"),
                     help="Per-channel std, e.g. 0.229,0.224,0.225."),
        click.option("--metadata", type=JsonObject(), help="A JSON object kept with the model."),
    ]):
        f = option(f)
    return f


def _model_line(m: dict[str, Any]) -> str:
    return (f"{m['id']}  {m['status']:<10}  {_clean_accuracy(m):<11}  {m['architecture']:<28}  {m['dataset']:<14}  "
            f"{m['name']}")


def _clean_accuracy(m: dict[str, Any]) -> str:
    """The sanity check in a list's column: 'acc 0.973', 'acc 0.750 !' (a warning), or '-'."""
    check = m.get("sanity_check") or {}
    if check.get("accuracy") is None:
        return "-"
    return f"acc {check['accuracy']:.3f}" + (" !" if check.get("status") == "warning" else "")


def _show_model(out: Out, model: Any, wait: bool, wait_timeout: float) -> int:
    if wait and model.status == "validating":
        model = out.client.models.wait(model.id, timeout=wait_timeout)
    m = _plain(model)
    if out.json:
        out.dump(m)
    else:
        click.echo(_model_line(m))
        if m["status"] == "ready" and m.get("input_size"):
            click.echo(f"  input {m['input_size']}  mean {m.get('input_mean')}  std {m.get('input_std')}")
        if m.get("sanity_check"):  # the clean accuracy on a sample of its data set, or a warning naming the cause
            click.echo(f"  {m['sanity_check']['message']}")
        if m.get("error"):
            click.echo(f"  rejected [{m['error'].get('code')}]: {m['error'].get('message')}", err=True)
    return 1 if m["status"] == "rejected" else 0


@client_command(models, "upload")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--architecture", required=True,
              help="small-cnn, preact-resnet-18, …, timm:<name>, torchvision:<name> (robustify architectures list).")
@click.option("--num-classes", type=click.IntRange(min=2), required=True, help="Classes of its head.")
@click.option("--dataset", required=True, help="What it was trained on: digits, cifar10, … or a dataset id.")
@click.option("--name", help="A name to show (default: the file name).")
@_input_options
@_wait_options
def models_upload(out: Out, file: Path, wait: bool, wait_timeout: float, **fields: Any) -> int:
    """Upload a safetensors state dict FILE (pickle files are refused)."""
    return _show_model(out, out.client.models.upload(_file(file), **fields), wait, wait_timeout)


@client_command(models, "add")
@click.argument("name")
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "imagenet"]), default="cifar10",
              show_default=True, help="The RobustBench data set.")
@click.option("--threat-model", type=click.Choice(["Linf", "L2", "corruptions"]), default="Linf",
              show_default=True, help="The RobustBench leaderboard.")
@click.option("--metadata", type=JsonObject(), help="A JSON object kept with the model.")
@_wait_options
def models_add(out: Out, name: str, wait: bool, wait_timeout: float, **fields: Any) -> int:
    """Register a RobustBench model by its zoo NAME, e.g. Wang2023Better_WRN-28-10."""
    return _show_model(out, out.client.models.add(name, **fields), wait, wait_timeout)


@client_command(models, "hub")
@click.argument("repo")
@click.option("--revision", help="A branch, tag or commit of the repository.")
@click.option("--num-classes", type=click.IntRange(min=2), required=True, help="Classes of its head.")
@click.option("--dataset", required=True, help="What it was trained on: imagenet, cifar10, … or a dataset id.")
@_input_options
@_wait_options
def models_hub(out: Out, repo: str, wait: bool, wait_timeout: float, **fields: Any) -> int:
    """Register a timm model of the Hugging Face Hub, REPO such as timm/resnet18.a1_in1k (read from
    the worker's Hugging Face cache)."""
    return _show_model(out, out.client.models.hub(repo, **fields), wait, wait_timeout)


@client_command(models, "get")
@click.argument("model_id")
def models_get(out: Out, model_id: str) -> int:
    """Show one model."""
    return _show_model(out, out.client.models.get(model_id), False, 0)


@client_command(models, "list")
@click.option("--status", type=click.Choice(["validating", "ready", "rejected"]), help="Only models in this state.")
@paging
def models_list(out: Out, status: str | None, limit: int, after: str | None, all_pages: bool) -> int:
    """List models, newest first."""
    return show_page(out, out.client.models.list(status=status, limit=limit, after=after), all_pages, _model_line)


@client_command(models, "delete")
@click.argument("model_id")
def models_delete(out: Out, model_id: str) -> int:
    """Delete a model and its stored weights (finished jobs keep referring to it)."""
    gone = out.client.models.delete(model_id)
    out.dump(gone) if out.json else click.echo(f"{gone.id}: deleted")
    return 0


@client_command(models, "download")
@click.argument("model_id")
@click.option("--out", "to", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="A folder, or a file name.")
def models_download(out: Out, model_id: str, to: Path) -> int:
    """Save a model's weights (safetensors, sha256 verified)."""
    path = out.client.models.download(model_id, to)
    out.dump({"path": str(path)}) if out.json else click.echo(str(path))
    return 0


# ------------------------------------------------------------------------------ datasets
@click.group(context_settings=CONTEXT)
def datasets() -> None:
    """Upload, list, inspect and delete data sets (digits, fashion-mnist, cifar10, cifar100 are built in)."""


def _dataset_line(d: dict[str, Any]) -> str:
    return f"{d['id']}  {d['num_examples']:>8} images  {d['image_shape']}  {d['num_classes']} classes  {d['name']}"


def _show_dataset(out: Out, dataset: Any) -> int:
    d = _plain(dataset)
    if out.json:
        out.dump(d)
        return 0
    click.echo(f"{d['id']}  {d['num_examples']} images {d['image_shape']}  {d['num_classes']} classes  {d['name']}")
    if d.get("class_names"):
        click.echo(f"  classes {', '.join(d['class_names'])}  split {d.get('splits')}")
    for split, counts in (d.get("class_counts") or {}).items():   # the census: images per class, label order
        click.echo(f"  {split} images per class: {' '.join(str(c) for c in counts)}")
    for warning in d.get("warnings") or []:
        click.echo(f"  warning ({warning.get('code')}): {warning.get('message')}")
    return 0


@client_command(datasets, "upload")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--name", help="A name to show (default: the file name).")
@click.option("--metadata", type=JsonObject(), help="A JSON object kept with the data set.")
@click.option("--image-size", type=Numbers("int"), help="Folders: resize to S, or H,W (cover and centre-crop).")
@click.option("--channels", type=click.Choice(["1", "3"]), help="Folders: 1 grayscale or 3 RGB (default 3).")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Folders without train/ and test/: the held-out share per class (default 0.2).")
@click.option("--seed", type=click.IntRange(min=0), help="Seed of that split (default 0).")
def datasets_upload(out: Out, file: Path, image_size: list[int] | None, channels: str | None, **fields: Any) -> int:
    """Upload FILE: an .npz (x uint8 images, y int labels) or a .zip / .tar of class folders."""
    size: int | tuple[int, int] | None = None
    if image_size:
        if len(image_size) > 2:
            raise click.BadParameter(f"give S or H,W, not {len(image_size)} numbers", param_hint="--image-size")
        size = image_size[0] if len(image_size) == 1 else (image_size[0], image_size[1])
    return _show_dataset(out, out.client.datasets.upload(_file(file), image_size=size,
                                                         channels=int(channels) if channels else None, **fields))


@client_command(datasets, "get")
@click.argument("dataset_id")
def datasets_get(out: Out, dataset_id: str) -> int:
    """Show one data set."""
    return _show_dataset(out, out.client.datasets.get(dataset_id))


@client_command(datasets, "list")
@paging
def datasets_list(out: Out, limit: int, after: str | None, all_pages: bool) -> int:
    """List uploaded data sets, newest first (the built-in ones need no upload)."""
    if not out.json:
        click.echo(f"built-in: {', '.join(BUILTIN_DATASETS)}")
    return show_page(out, out.client.datasets.list(limit=limit, after=after), all_pages, _dataset_line)


@client_command(datasets, "delete")
@click.argument("dataset_id")
def datasets_delete(out: Out, dataset_id: str) -> int:
    """Delete an uploaded data set."""
    gone = out.client.datasets.delete(dataset_id)
    out.dump(gone) if out.json else click.echo(f"{gone.id}: deleted")
    return 0


# ------------------------------------------------------------------------------ architectures
@click.group(context_settings=CONTEXT)
def architectures() -> None:
    """The architectures a model may have."""


@client_command(architectures, "list", retries=0)
@click.option("--family", type=click.Choice(["builtin", "timm", "torchvision", "robustbench"]),
              help="Search this family's names.")
@click.option("--q", help="Part of a name, or a pattern with * and ?.")
@paging
def architectures_list(out: Out, family: str | None, q: str | None, limit: int, after: str | None,
                       all_pages: bool) -> int:
    """The built-ins and the families; with --family or --q, the matching names."""
    from robustify import ServiceUnavailableError

    told, deadline = False, time.monotonic() + 600
    while True:
        try:
            page = out.client.architectures.list(family=family, q=q, limit=limit, after=after)
            break
        except ServiceUnavailableError as exc:
            # a server lists a family's names once, in the background: wait for that
            if exc.code != "catalog_building" or time.monotonic() > deadline:
                raise
            if not told:
                click.echo(f"{exc.detail} waiting…", err=True)
                told = True
            time.sleep(min(float(exc.headers.get("retry-after") or 2), 10.0))

    def line(a: dict[str, Any]) -> str:
        return f"{a['pattern']:<34}  {a['description']}" if a["object"] == "architecture_family" else a["id"]

    return show_page(out, page, all_pages, line)


# ------------------------------------------------------------------------------ jobs
@click.group(context_settings=CONTEXT)
def jobs() -> None:
    """Submit fine-tuning and evaluation jobs, follow them, fetch their results."""


@jobs.command("fields", context_settings=CONTEXT)
@click.argument("recipe", type=click.Choice(RECIPES))
def jobs_fields(recipe: str) -> int:
    """The fields of a RECIPE (finetune or evaluate) that --set and --config take: type, default,
    meaning (also `--set help`)."""
    click.echo(fields_help(recipe))
    return 0


@client_command(jobs, "submit")
@click.option("--type", "recipe", type=click.Choice(RECIPES), default="finetune", show_default=True,
              help="The recipe.")
@click.option("--model", help="A model id (mdl_…), or robustbench:<name>.  [required]")
@click.option("--dataset", help="digits, fashion-mnist, cifar10, cifar100 or a dataset id (ds_…).  [required]")
@click.option("--threat-model", type=click.Choice(THREAT_KINDS),
              help="The threat model's kind (default w2-linf).")
@click.option("--delta", type=Radius(), help="The radius δ, a number or a fraction (8/255).")
@click.option("--deltas", type=Numbers("radius"), help="evaluate: several radii for a curve, e.g. 2/255,8/255.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed of the recipe.")
@click.option("--config", type=JsonObject(), help="Recipe fields as a JSON object, inline or @file.json.")
@click.option("--set", "assignments", multiple=True, metavar="FIELD=VALUE",
              help="One recipe field (repeatable; wins over --config). VALUE is JSON or a fraction; "
                   "`--set help` (or `robustify jobs fields TYPE`) lists the fields.")
@click.option("--metadata", type=JsonObject(), help="A JSON object kept with the job.")
@click.option("--webhook", metavar="URL", help="POST this job's signed webhooks to URL.")
@click.option("--webhook-event", "webhook_events", multiple=True, metavar="TYPE",
              help="Only these event types (repeatable), e.g. job.succeeded.")
@click.option("--idempotency-key", help="Submitting again with the same key returns the same job.")
@click.option("--watch", is_flag=True, help="Then follow it until it ends (exit 1 unless it succeeds).")
@progress_options
def jobs_submit(out: Out, recipe: JobType, model: str | None, dataset: str | None, threat_model: str | None,
                delta: float | None, deltas: list[float] | None, seed: int | None, config: dict[str, Any] | None,
                assignments: tuple[str, ...], metadata: dict[str, Any] | None, webhook: str | None,
                webhook_events: tuple[str, ...], idempotency_key: str | None, watch: bool,
                progress_mode: str | None, quiet: bool) -> int:
    """Submit a fine-tuning or evaluation job (with --quiet, print only its id)."""
    fields = recipe_fields(config, assignments, recipe)    # `--set help` lists the fields and ends here
    model, dataset = require(model=model, dataset=dataset)
    if deltas:
        if recipe != "evaluate":
            raise click.BadParameter("--deltas is an evaluate field", param_hint="--deltas")
        fields["deltas"] = deltas
    threat = None
    if threat_model or delta is not None:
        threat = {"kind": threat_model or "w2-linf", **({"delta": delta} if delta is not None else {})}
    hook: Any = None
    if webhook:
        hook = {"url": webhook, **({"events": list(webhook_events)} if webhook_events else {})}
    ref: dict[str, Any] = ({"robustbench": model.split(":", 1)[1]} if model.startswith("robustbench:")
                           else {"model_id": model})
    job = out.client.jobs.create(type=recipe, dataset=dataset, threat_model=threat, config=fields, seed=seed,
                                 metadata=metadata, webhook=hook, idempotency_key=idempotency_key, **ref)
    j = _plain(job)
    if out.json:
        out.dump(j)
    elif quiet:
        click.echo(j["id"])
    else:
        click.echo(f"{j['id']}  {j['status']}  {j['type']} of {j['model_id']} on {j['dataset']}")
        cfg = j["config"]
        if j["type"] == "finetune":
            from cli.result_table import attack_summary
            click.echo(f"  epochs {cfg['epochs']}, batch_size {cfg['batch_size']}, lr {cfg['lr']}, beta {cfg['beta']}, "
                       f"threat {cfg['threat_model']['kind']} δ={cfg['threat_model']['delta']:.4g}, "
                       f"inner attack {attack_summary(cfg)}")
        from cli.estimates import estimate_line
        line = estimate_line(j.get("estimate"))
        if line:
            click.echo(f"  {line}")
    return watch_job(out, job.id, progress_mode=progress_mode, quiet=quiet) if watch else 0


def _job_line(j: dict[str, Any]) -> str:
    return f"{j['id']}  {j['status']:<10}  {j['type']:<8}  {j['model_id']}  {j['dataset']}  {j['created_at']}"


@client_command(jobs, "list")
@click.option("--status", multiple=True, type=click.Choice(JOB_STATES),
              help="Only jobs in this state (repeatable).")
@click.option("--type", "recipe", type=click.Choice(RECIPES), help="Only this recipe.")
@click.option("--model-id", help="Only jobs of this model.")
@paging
def jobs_list(out: Out, status: tuple[str, ...], recipe: str | None, model_id: str | None, limit: int,
              after: str | None, all_pages: bool) -> int:
    """List jobs, newest first."""
    page = out.client.jobs.list(status=list(status) or None, type=recipe, model_id=model_id, limit=limit, after=after)
    return show_page(out, page, all_pages, _job_line)


def _summary(job: dict[str, Any]) -> str:
    from cli.result_table import result_table

    lines = [f"{job['id']}: {job['status']} ({job['type']}, attempt {job['attempt']})"]
    p = job.get("progress") or {}
    if job["status"] not in TERMINAL_STATUSES and p.get("fraction") is not None:
        lines.append(f"  progress {100 * p['fraction']:.0f}%  phase {p.get('phase')}  epoch {p.get('epoch')}"
                     f"/{p.get('total_epochs')}  eta {format_eta(p.get('eta_seconds'))}")
    metrics = {k: v for k, v in (job.get("latest_metrics") or {}).items() if v is not None}
    if metrics:
        lines.append("  latest " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in metrics.items()))
    if job.get("error"):
        lines.append(f"  error [{job['error'].get('code')}]: {job['error'].get('message')}")
    if job.get("result"):
        lines.append(result_table(job["result"]))
        if job["result"].get("model_id"):
            what = ("registered model" if job["result"].get("improved") is not False
                    else "the input model (handed back)")
            lines.append(f"  {what} {job['result']['model_id']}: robustify jobs submit --type evaluate "
                         f"--model {job['result']['model_id']} --dataset {job['dataset']}")
    return "\n".join(lines)


def _get(out: Out, job_id: str) -> int:
    job = _plain(out.client.jobs.get(job_id))
    out.dump(job) if out.json else click.echo(_summary(job))
    return 0


@client_command(jobs, "get")
@click.argument("job_id")
def jobs_get(out: Out, job_id: str) -> int:
    """Show a job: status, progress, latest numbers, and a finished job's before/after table."""
    return _get(out, job_id)


@client_command(jobs, "status", hidden=True)
@click.argument("job_id")
def jobs_status(out: Out, job_id: str) -> int:
    """The former name of `jobs get`."""
    return _get(out, job_id)


@client_command(jobs, "cancel")
@click.argument("job_id")
def jobs_cancel(out: Out, job_id: str) -> int:
    """Cancel a job (a running one stops at its next check, keeping its checkpoints)."""
    job = out.client.jobs.cancel(job_id)
    out.dump(job) if out.json else click.echo(f"{job.id}: {job.status}")
    return 0


@client_command(jobs, "events")
@click.argument("job_id")
@click.option("--after", type=click.IntRange(min=0), default=0, help="Only events after this event id.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="Events per page.")
@click.option("--follow", is_flag=True, help="Keep following the stream until the job ends (Server-Sent Events).")
def jobs_events(out: Out, job_id: str, after: int, limit: int, follow: bool) -> int:
    """A job's event log, oldest first (every page of it)."""
    events: Iterable[Any] = (out.client.jobs.stream(job_id, after=after) if follow
                             else out.client.jobs.events(job_id, after=after, limit=limit))
    for e in events:
        if out.json:
            click.echo(json.dumps(_plain(e)))
        else:
            click.echo(f"{e.id:>6}  {e.created_at:%Y-%m-%d %H:%M:%S}  {e.type:<10} {e.level:<7} {e.message or ''}"
                       if e.created_at else f"{e.id:>6}  {e.type:<10} {e.level:<7} {e.message or ''}")
    return 0


@client_command(jobs, "watch")
@click.argument("job_id")
@progress_options
def jobs_watch(out: Out, job_id: str, progress_mode: str | None, quiet: bool) -> int:
    """Follow a job live until it ends, then print its result; exit 0 if it succeeds.

    \b
    A progress bar on a terminal; in a log or a file (or with --progress plain) one line per
    phase or epoch, or every 30 s, with the percentage and the ETA."""
    return watch_job(out, job_id, progress_mode=progress_mode, quiet=quiet)


def watch_job(out: Out, job_id: str, *, progress_mode: str | None = None, quiet: bool = False) -> int:
    """Follow a job to its end, showing its progress (cli.progress); 0 if the job succeeded.

    A background thread follows the event stream (the SDK resumes it with Last-Event-ID when it
    breaks) and the job is read again at most once a second: events mark phases and epochs, the
    job carries the fine-grained fraction and ETA. Progress goes to stdout, or to stderr with
    --json (whose stdout is the final job's JSON; no progress unless --progress asks for it)."""
    client = out.client
    stream = sys.stderr if out.json else sys.stdout
    mode = resolve_mode(progress_mode, quiet, stream, default="none" if out.json else None)
    job = _plain(client.jobs.get(job_id))
    shown = JobProgress(mode, stream)
    events: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()

    def follow() -> None:
        try:
            for event in client.jobs.stream(job_id):
                events.put(event)
                if stop.is_set():
                    return
        except Exception:  # the main loop keeps polling the job
            return

    threading.Thread(target=follow, daemon=True).start()
    shown.update(job)
    last_read = time.monotonic()
    try:
        while job["status"] not in TERMINAL_STATUSES:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                event = None
            if event is not None and event.type == "warning":
                shown.write(f"warning: {event.message}")
            if event is not None or time.monotonic() - last_read >= 1.0:
                job = _plain(client.jobs.get(job_id))
                last_read = time.monotonic()
                shown.update(job)
    finally:
        stop.set()
        shown.close()
    if out.json:
        click.echo(json.dumps(job, indent=2))
    else:
        click.echo(_summary(job))
    return 0 if job["status"] == "succeeded" else 1


@client_command(jobs, "checkpoints")
@click.argument("job_id")
def jobs_checkpoints(out: Out, job_id: str) -> int:
    """A fine-tune's checkpoints, one per epoch (`jobs download --epoch N` saves one)."""
    items = out.client.jobs.checkpoints(job_id)
    if out.json:
        out.dump(items)
        return 0
    for c in items:
        metrics = {k: v for k, v in (c.metrics or {}).items() if isinstance(v, (int, float))}
        shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        click.echo(f"{c.id}  epoch {c.epoch:<4} {'best' if c.is_best else '    '}  {c.size:>10} bytes  {shown}")
    return 0


@client_command(jobs, "download")
@click.argument("job_id")
@click.option("--out", "to", type=click.Path(path_type=Path, file_okay=False), help="Folder (default: the job id).")
@click.option("--epoch", type=click.IntRange(min=0), help="The checkpoint of this epoch instead of the best one.")
def jobs_download(out: Out, job_id: str, to: Path | None, epoch: int | None) -> int:
    """Save the best checkpoint (or --epoch's), report.json and report.png, sha256 verified."""
    from cli.result_table import result_table

    got = out.client.jobs.download(job_id, to, epoch=epoch)
    files = {"checkpoint": got.checkpoint, "report": got.report, "plot": got.plot}
    if out.json:
        out.dump({k: str(v) if v else None for k, v in files.items()})
    else:
        for kind, path in files.items():
            click.echo(f"{kind:<10} {path if path else '(none yet)'}")
    if not any(files.values()):
        raise Failure(f"job {job_id} has nothing to download yet", code="not_found")
    job = out.client.jobs.get(job_id)
    if job.result and not out.json:
        click.echo(result_table(job.result))
    return 0


@client_command(jobs, "report")
@click.argument("job_id")
def jobs_report(out: Out, job_id: str) -> int:
    """Print a finished job's report (JSON)."""
    click.echo(json.dumps(out.client.jobs.report(job_id), indent=2))
    return 0


@client_command(jobs, "deliveries")
@click.argument("job_id")
def jobs_deliveries(out: Out, job_id: str) -> int:
    """The job's webhook deliveries and their attempts."""
    items = out.client.jobs.webhook_deliveries(job_id)
    if out.json:
        out.dump(items)
        return 0
    for d in items:
        last = d.attempts[-1] if d.attempts else None
        click.echo(f"{d.id}  {d.event_type:<16} {d.status:<9} {len(d.attempts)} attempt(s)"
                   + (f", last: {last.status_code or last.error}" if last else ""))
    return 0


# ------------------------------------------------------------------------------ webhooks
@click.group(context_settings=CONTEXT)
def webhooks() -> None:
    """The endpoints that receive signed job webhooks."""


def _endpoint_line(e: dict[str, Any]) -> str:
    events = ",".join(e["events"]) if e.get("events") else "every event"
    return f"{e['id']}  {e['url']}  {events}{'  (default)' if e.get('default') else ''}"


@client_command(webhooks, "create")
@click.argument("target", metavar="URL")
@click.option("--event", "events", multiple=True, metavar="TYPE",
              help="Only these event types (repeatable), e.g. job.succeeded; default every type.")
@click.option("--default", "default", is_flag=True, help="Send the webhooks of every job of this key that names none.")
@click.option("--description", help="A note kept with the endpoint.")
def webhooks_create(out: Out, target: str, events: tuple[str, ...], default: bool, description: str | None) -> int:
    """Register URL; prints its signing secret (whsec_…), which verifies the signatures."""
    e = out.client.webhooks.create(target, events=list(events) or None, default=default, description=description)
    out.dump(e) if out.json else click.echo(f"{_endpoint_line(_plain(e))}\n  secret {e.secret}")
    return 0


@client_command(webhooks, "get")
@click.argument("endpoint_id")
def webhooks_get(out: Out, endpoint_id: str) -> int:
    """Show one endpoint, with its secret."""
    e = out.client.webhooks.get(endpoint_id)
    out.dump(e) if out.json else click.echo(f"{_endpoint_line(_plain(e))}\n  secret {e.secret}")
    return 0


@client_command(webhooks, "list")
@paging
def webhooks_list(out: Out, limit: int, after: str | None, all_pages: bool) -> int:
    """List the endpoints of this key."""
    return show_page(out, out.client.webhooks.list(limit=limit, after=after), all_pages, _endpoint_line)


@client_command(webhooks, "delete")
@click.argument("endpoint_id")
def webhooks_delete(out: Out, endpoint_id: str) -> int:
    """Delete an endpoint (its pending deliveries stop)."""
    gone = out.client.webhooks.delete(endpoint_id)
    out.dump(gone) if out.json else click.echo(f"{gone.id}: deleted")
    return 0

