"""`robustify sweep`: fine-tune one model once per δ (and β or schedule), then read the frontier.

    robustify sweep submit --model mdl_… --dataset digits --delta 2/255,4/255,8/255 --max-clean-drop 0.03
    robustify sweep show job_…        # one row per child: clean, W2, pointwise (intervals), Pareto, the pick
    robustify sweep promote job_…     # the recommended child's model (or name a child's job id)

A client of a running server, like `robustify jobs` (the sweep is a job of type sweep).
"""
from __future__ import annotations

from typing import Any

import click

from cli.client import Out, _plain, client_command
from cli.params import CONTEXT, THREAT_KINDS, Failure, JsonObject, Numbers, recipe_fields


@click.group(context_settings=CONTEXT)
def sweep() -> None:
    """Sweep δ (and β or the attack schedule): one fine-tune per value, the accuracy–robustness
    frontier, and the child a stated rule recommends."""


@client_command(sweep, "submit")
@click.option("--model", required=True, help="A model id (mdl_…).")
@click.option("--dataset", required=True, help="digits, fashion-mnist, cifar10, cifar100 or a dataset id (ds_…).")
@click.option("--threat-model", type=click.Choice(THREAT_KINDS), help="The threat model's kind (default w2-linf).")
@click.option("--delta", "deltas", type=Numbers("radius"), required=True, help="The radii δ, e.g. 2/255,4/255,8/255.")
@click.option("--beta", "betas", type=Numbers("float"), help="TRADES weights β to sweep too, e.g. 1,6.")
@click.option("--schedule", "schedules", help="Attack schedules to sweep too, e.g. standard,memory.")
@click.option("--maximize", type=click.Choice(["w2", "linf", "l2", "clean", "corruption", "delta"]), default="w2",
              show_default=True, help="What the recommended child has most of.")
@click.option("--max-clean-drop", type=click.FloatRange(0, 1), default=0.03, show_default=True,
              help="Largest drop of clean accuracy (test split) a recommended child may have.")
@click.option("--no-clean-limit", is_flag=True, help="No limit on the clean accuracy's drop.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed of every child's recipe.")
@click.option("--config", type=JsonObject(), help="The fine-tune's fields as a JSON object, inline or @file.json.")
@click.option("--set", "assignments", multiple=True, metavar="FIELD=VALUE",
              help="One fine-tune field (repeatable; wins over --config); `--set help` lists them.")
@click.option("--quiet", is_flag=True, help="Print only the sweep's id.")
def sweep_submit(out: Out, model: str, dataset: str, threat_model: str | None,
                 deltas: list[float], betas: list[float] | None, schedules: str | None, maximize: str,
                 max_clean_drop: float, no_clean_limit: bool, seed: int | None, config: dict[str, Any] | None,
                 assignments: tuple[str, ...], quiet: bool) -> int:
    """Submit a sweep: one fine-tune child per combination of the values (at most 16)."""
    fields = recipe_fields(config, assignments, "finetune")
    threat = {"kind": threat_model} if threat_model else None
    job = out.client.jobs.sweep(
        dataset=dataset, model_id=model, delta=deltas, beta=betas,
        attack_schedule=[s.strip() for s in schedules.split(",") if s.strip()] if schedules else None,
        maximize=maximize, max_clean_drop=None if no_clean_limit else max_clean_drop, threat_model=threat,
        config=fields, seed=seed)
    if out.json:
        out.dump(job)
    elif quiet:
        click.echo(job.id)
    else:
        children = out.client.jobs.children(job.id)
        click.echo(f"{job.id}  {job.status}  sweep of {job.model_id} on {job.dataset}: {len(children)} fine-tunes")
        for child in children:
            values = (child.metadata or {}).get("sweep_values") or {}
            click.echo(f"  {child.id}  {child.status}  " + ", ".join(f"{k}={v}" for k, v in values.items()))
        click.echo(f"follow it: robustify jobs watch {job.id}; then: robustify sweep show {job.id}")
    return 0


def _pct(value: Any, interval: Any = None) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    text = f"{100 * value:5.1f}%"
    if isinstance(interval, list) and len(interval) == 2:
        text += f" [{100 * interval[0]:.0f},{100 * interval[1]:.0f}]"
    return text


def frontier_table(result: dict[str, Any]) -> list[str]:
    """The frontier as text lines: one per child, then the recommendation."""
    points = result.get("points") or []
    ground = "l2" if any("l2_robust_accuracy" in p for p in points) else "linf"
    lines = [f"{'child':<28} {'delta':>8} {'clean [95% CI]':>18} {'W2 robust':>18} {ground + ' robust':>18}  "
             "pareto  pick"]
    for p in points:
        extra = "".join(f", {k}={p[k]}" for k in ("beta", "attack_schedule") if k in p)
        cells = [_pct(p.get(f"{k}_accuracy"), p.get(f"{k}_accuracy_ci95"))
                 for k in ("clean", "w2_robust", f"{ground}_robust")]
        lines.append(f"{p['job_id']:<28} {p['delta']:>8.4g} {cells[0]:>18} {cells[1]:>18} {cells[2]:>18}  "
                     f"{'yes' if p.get('pareto') else '':<6}  {'<-' if p.get('recommended') else ''}"
                     + (f"  ({p['status']})" if p.get("status") != "succeeded" else "") + extra)
    rec = result.get("recommendation") or {}
    lines.append(f"rule: {rec.get('rule_text', '')}")
    lines.append(f"recommended: {rec.get('job_id') or 'none'} ({rec.get('reason', '')})")
    return lines


@client_command(sweep, "show")
@click.argument("sweep_id")
def sweep_show(out: Out, sweep_id: str) -> int:
    """A sweep's children and, once they have ended, its frontier and recommendation."""
    job = out.client.jobs.get(sweep_id)
    if job.type != "sweep":
        raise Failure(f"{sweep_id} is a {job.type} job, not a sweep.", code="not_a_sweep")
    if out.json:
        out.dump({"sweep": _plain(job), "children": _plain(out.client.jobs.children(sweep_id))})
        return 0
    click.echo(f"{job.id}  {job.status}  sweep of {job.model_id} on {job.dataset}")
    if not job.result:
        for child in out.client.jobs.children(sweep_id):
            values = (child.metadata or {}).get("sweep_values") or {}
            fraction = child.progress.fraction or 0.0
            click.echo(f"  {child.id}  {child.status:<10} {100 * fraction:3.0f}%  "
                       + ", ".join(f"{k}={v}" for k, v in values.items()))
        return 0
    for line in frontier_table(job.result):
        click.echo(line)
    return 0 if job.status == "succeeded" else 1


@client_command(sweep, "promote")
@click.argument("job_id")
def sweep_promote(out: Out, job_id: str) -> int:
    """The model of a fine-tune's best checkpoint: JOB_ID is a child, or a sweep (its recommended child)."""
    job = out.client.jobs.get(job_id)
    if job.type == "sweep":
        chosen = ((job.result or {}).get("recommendation") or {}).get("job_id")
        if not chosen:
            raise Failure(f"sweep {job_id} recommends no child ({job.status}); promote a child by its job id.",
                          code="no_recommendation")
        job_id = chosen
    model = out.client.jobs.promote(job_id)
    if out.json:
        out.dump(model)
    else:
        click.echo(f"{model.id}  {model.status}  {model.name}  (from {job_id})")
    return 0
