"""`robustify models|datasets|jobs|architectures …`: the command-line client of a running robustify server.

The server is --url (or ROBUSTIFY_URL, default http://127.0.0.1:8000) and the key --key (or
ROBUSTIFY_API_KEY). Problem responses print their message and code and exit with status 1.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from core.result_table import result_table

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "failed", "cancelled"}


class ClientError(Exception):
    """A failed request, with a message ready for the terminal."""


class Api:
    """A thin httpx wrapper that turns problem responses into ClientError."""

    def __init__(self, url: str, key: str | None, http: httpx.Client | None = None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        # redirects: downloads may answer 307 to a presigned object-storage URL (httpx then drops
        # the Authorization header, as it must for another host)
        self.http = http or httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(30.0, read=300.0),
                                         follow_redirects=True)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.ConnectError:
            raise ClientError(f"cannot reach the server at {self.url}: is it running (`robustify serve`)? "
                              "Set --url or ROBUSTIFY_URL to point elsewhere.") from None
        except httpx.TimeoutException:
            raise ClientError(f"the server at {self.url} did not answer in time") from None
        if resp.status_code >= 400:
            raise ClientError(describe_problem(resp))
        return resp

    def json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()


def describe_problem(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return f"HTTP {resp.status_code}: {resp.text[:300]}"
    detail = body.get("detail") or body.get("title") or resp.reason_phrase
    text = f"{detail} [{body.get('code', 'error')}, HTTP {resp.status_code}]"
    for err in body.get("errors") or []:
        text += f"\n  {err.get('field') or '.'.join(map(str, err.get('loc', [])))}: {err.get('msg')}"
    if resp.status_code == 401:
        text += "\n  pass --key or set ROBUSTIFY_API_KEY (create a key with `robustify keys create NAME`)."
    return text


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ------------------------------------------------------------------------------- models
def models_add(api: Api, args: argparse.Namespace) -> int:
    body = {"source": "robustbench", "name": args.name, "dataset": args.dataset, "threat_model": args.threat_model}
    m = api.json("POST", "/v1/models", json=body)
    return _show_model(api, m, args)


def models_hub(api: Api, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"source": "hf-hub", "name": args.repo, "num_classes": args.num_classes,
                            "dataset": args.dataset}
    for field in ("revision", "input_size", "input_mean", "input_std"):
        if getattr(args, field):
            body[field] = getattr(args, field)
    if args.metadata:
        body["metadata"] = json.loads(args.metadata)
    return _show_model(api, api.json("POST", "/v1/models", json=body), args)


def models_upload(api: Api, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise ClientError(f"no such file: {path}")
    data = {"architecture": args.architecture, "num_classes": str(args.num_classes), "dataset": args.dataset}
    for field in ("name", "input_size", "input_mean", "input_std", "metadata"):
        value = getattr(args, field)
        if value:
            data[field] = ",".join(map(str, value)) if isinstance(value, list) else value
    with open(path, "rb") as fh:
        m = api.json("POST", "/v1/models", data=data, files={"file": (path.name, fh, "application/octet-stream")})
    return _show_model(api, m, args)


def _numbers(kind: type) -> Any:
    """An argparse type: "3,224,224" or "3x224x224" -> [3, 224, 224] (the JSON body takes lists)."""
    def parse(text: str) -> list[Any]:
        try:
            return [kind(p) for p in text.strip().strip("[]").replace("x", ",").split(",") if p.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {kind.__name__} numbers separated by commas") from None

    return parse


def _show_model(api: Api, m: dict[str, Any], args: argparse.Namespace) -> int:
    if args.wait:
        deadline = time.monotonic() + args.wait_timeout
        while m["status"] == "validating" and time.monotonic() < deadline:
            time.sleep(1.0)
            m = api.json("GET", f"/v1/models/{m['id']}")
    if args.json:
        _print(m)
    else:
        print(f"{m['id']}  {m['status']}  {m['architecture']}  {m['dataset']}  {m['name']}")
        if m["status"] == "ready" and m.get("input_size"):
            print(f"  input {m['input_size']}  mean {m.get('input_mean')}  std {m.get('input_std')}")
        if m.get("error"):
            print(f"  rejected: {m['error'].get('message')}", file=sys.stderr)
    return 1 if m["status"] == "rejected" else 0


def models_list(api: Api, args: argparse.Namespace) -> int:
    rows = list(_pages(api, "/v1/models", {"limit": 100}))
    if args.json:
        _print(rows)
        return 0
    for m in rows:
        print(f"{m['id']}  {m['status']:<10}  {m['architecture']:<28}  {m['dataset']:<14}  {m['name']}")
    return 0


def _pages(api: Api, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    after = None
    while True:
        page = api.json("GET", path, params={**params, **({"after": after} if after else {})})
        yield from page["data"]
        if not page["has_more"]:
            return
        after = page["last_id"]


# ------------------------------------------------------------------------------- datasets
def datasets_upload(api: Api, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise ClientError(f"no such file: {path}")
    data = {"name": args.name or path.name}
    for field in ("image_size", "channels", "test_fraction", "seed"):   # image-folder archives only
        if getattr(args, field) is not None:
            data[field] = str(getattr(args, field))
    with open(path, "rb") as fh:
        d = api.json("POST", "/v1/datasets", data=data, files={"file": (path.name, fh, "application/octet-stream")})
    if args.json:
        _print(d)
    else:
        print(f"{d['id']}  {d['num_examples']} images {d['image_shape']}  {d['num_classes']} classes  {d['name']}")
        if d.get("class_names"):
            print(f"  classes {', '.join(d['class_names'])}  split {d.get('splits')}")
    return 0


def datasets_list(api: Api, args: argparse.Namespace) -> int:
    rows = list(_pages(api, "/v1/datasets", {"limit": 100}))
    if args.json:
        _print(rows)
        return 0
    print("built-in: digits, fashion-mnist, cifar10, cifar100")
    for d in rows:
        print(f"{d['id']}  {d['num_examples']:>8} images  {d['image_shape']}  {d['num_classes']} classes  {d['name']}")
    return 0


# ------------------------------------------------------------------------------- architectures
def architectures_list(api: Api, args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("family", args.family), ("q", args.q)) if v}
    _wait_for_catalog(api, params)
    rows = list(_pages(api, "/v1/architectures", {**params, "limit": 100}))
    if args.json:
        _print(rows)
        return 0
    for a in rows:
        if a["object"] == "architecture_family":
            print(f"{a['pattern']:<34}  {a['description']}")
        else:
            print(a["id"])
    return 0


def _wait_for_catalog(api: Api, params: dict[str, Any], timeout: float = 600.0) -> None:
    """A server lists a family's names once, in the background, answering 503 catalog_building
    meanwhile: wait for that (any other answer is for the listing itself to show)."""
    deadline = time.monotonic() + timeout
    told = False
    while time.monotonic() < deadline:
        try:
            resp = api.http.request("GET", "/v1/architectures", params={**params, "limit": 1})
            building = resp.status_code == 503 and resp.json().get("code") == "catalog_building"
        except (httpx.HTTPError, ValueError):
            return
        if not building:
            return
        if not told:
            print(f"the server is listing the architectures ({resp.json().get('detail')}); waiting…", file=sys.stderr)
            told = True
        time.sleep(min(float(resp.headers.get("retry-after") or 2), 10.0))


# ------------------------------------------------------------------------------- jobs
def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def jobs_submit(api: Api, args: argparse.Namespace) -> int:
    config: dict[str, Any] = json.loads(args.config) if args.config else {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ClientError(f"--set expects key=value, got {item!r}")
        config[key.strip()] = _parse_value(value)
    body: dict[str, Any] = {"type": args.type, "dataset": args.dataset, "config": config}
    if args.model.startswith("robustbench:"):
        body["model"] = {"robustbench": {"name": args.model.split(":", 1)[1]}}
    else:
        body["model_id"] = args.model
    if args.threat_model or args.delta is not None:
        body["threat_model"] = {"kind": args.threat_model or "w2-linf",
                                **({"delta": args.delta} if args.delta is not None else {})}
    if args.seed is not None:
        body["seed"] = args.seed
    if args.metadata:
        body["metadata"] = json.loads(args.metadata)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    job = api.json("POST", "/v1/jobs", json=body, headers=headers)
    if args.json:
        _print(job)
    else:
        print(f"{job['id']}  {job['status']}  {job['type']} of {job['model_id']} on {job['dataset']}")
        if job["type"] == "finetune":
            cfg = job["config"]
            print(f"  epochs {cfg['epochs']}, batch_size {cfg['batch_size']}, lr {cfg['lr']}, beta {cfg['beta']}, "
                  f"threat {cfg['threat_model']['kind']} δ={cfg['threat_model']['delta']:.4g}")
    if args.watch:
        return watch(api, job["id"], quiet=args.json)
    return 0


def jobs_list(api: Api, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": min(args.limit, 100)}
    if args.status:
        params["status"] = args.status
    page = api.json("GET", "/v1/jobs", params=params)
    if args.json:
        _print(page["data"])
        return 0
    for j in page["data"]:
        print(f"{j['id']}  {j['status']:<10}  {j['type']:<8}  {j['model_id']}  {j['dataset']}  {j['created_at']}")
    return 0


def _summary(job: dict[str, Any]) -> str:
    lines = [f"{job['id']}: {job['status']} ({job['type']}, attempt {job['attempt']})"]
    p = job.get("progress") or {}
    if job["status"] not in TERMINAL and p.get("fraction") is not None:
        lines.append(f"  progress {100 * p['fraction']:.0f}%  phase {p.get('phase')}  epoch {p.get('epoch')}"
                     f"/{p.get('total_epochs')}  eta {p.get('eta_seconds')} s")
    metrics = {k: v for k, v in (job.get("latest_metrics") or {}).items() if v is not None}
    if metrics:
        lines.append("  latest " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in metrics.items()))
    if job.get("error"):
        lines.append(f"  error [{job['error'].get('code')}]: {job['error'].get('message')}")
    if job.get("result"):
        lines.append(result_table(job["result"]))
        if job["result"].get("model_id"):
            lines.append(f"  registered model {job['result']['model_id']}: robustify jobs submit --type evaluate "
                         f"--model {job['result']['model_id']} --dataset {job['dataset']}")
    return "\n".join(lines)


def jobs_status(api: Api, args: argparse.Namespace) -> int:
    job = api.json("GET", f"/v1/jobs/{args.job_id}")
    print(json.dumps(job, indent=2) if args.json else _summary(job))
    return 0


def jobs_cancel(api: Api, args: argparse.Namespace) -> int:
    job = api.json("POST", f"/v1/jobs/{args.job_id}/cancel")
    print(json.dumps(job, indent=2) if args.json else f"{job['id']}: {job['status']}")
    return 0


def _sse_events(api: Api, job_id: str, last_id: int) -> Iterator[dict[str, Any]]:
    headers = {"Accept": "text/event-stream"}
    if last_id:
        headers["Last-Event-ID"] = str(last_id)
    with api.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                         timeout=httpx.Timeout(30.0, read=120.0)) as resp:
        if resp.status_code >= 400:
            resp.read()
            raise ClientError(describe_problem(resp))
        fields: dict[str, str] = {}
        for line in resp.iter_lines():
            if not line:
                if "data" in fields:
                    yield {"id": int(fields.get("id", "0") or 0), "event": fields.get("event", "message"),
                           "data": json.loads(fields["data"])}
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value


def watch(api: Api, job_id: str, *, quiet: bool = False) -> int:
    """Live progress bar; 0 if the job succeeded.

    A background thread follows the event stream (resuming with Last-Event-ID when it breaks)
    and the bar re-reads the job at most once a second: events mark phases and epochs, the job
    row carries the fine-grained fraction and ETA.
    """
    import queue
    import threading

    from tqdm import tqdm

    job = api.json("GET", f"/v1/jobs/{job_id}")
    bar = tqdm(total=100, desc=job["status"], unit="%", disable=quiet,
               bar_format="{desc:<16} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()
    stop = threading.Event()

    def follow() -> None:
        last_id, failures = 0, 0
        while not stop.is_set():
            try:
                for ev in _sse_events(api, job_id, last_id):
                    last_id = ev["id"]
                    events.put(ev)
                    if stop.is_set():
                        return
                events.put(None)  # the server ends the stream once the job is terminal
                return
            except (httpx.HTTPError, ClientError):
                failures += 1
                if failures > 30:
                    return  # keep polling in the main loop
                stop.wait(min(1.0 * failures, 10.0))

    def refresh(j: dict[str, Any]) -> None:
        progress = j.get("progress") or {}
        bar.n = min(100.0, round(100 * float(progress.get("fraction") or 0.0), 1))
        phase = progress.get("phase")
        bar.set_description_str(j["status"] + (f" {phase}" if phase and j["status"] == "running" else ""))
        metrics = {k: f"{v:.3f}" for k, v in (j.get("latest_metrics") or {}).items() if isinstance(v, float)}
        if progress.get("epoch") is not None:
            metrics = {"epoch": f"{progress['epoch']}/{progress.get('total_epochs')}", **metrics}
        bar.set_postfix(metrics, refresh=False)
        bar.refresh()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    refresh(job)
    last_read = time.monotonic()
    try:
        while job["status"] not in TERMINAL:
            try:
                ev = events.get(timeout=0.5)
            except queue.Empty:
                ev = None
            if ev is not None and ev["event"] == "warning" and not quiet:
                bar.write(f"warning: {ev['data'].get('message')}")
            if ev is not None or time.monotonic() - last_read >= 1.0:
                job = api.json("GET", f"/v1/jobs/{job_id}")
                last_read = time.monotonic()
                refresh(job)
    finally:
        stop.set()
        bar.close()
    if not quiet:
        print(_summary(job))
    return 0 if job["status"] == "succeeded" else 1


def jobs_watch(api: Api, args: argparse.Namespace) -> int:
    return watch(api, args.job_id, quiet=args.json)


def _filename(resp: httpx.Response, default: str) -> str:
    from robustify._transport import filename_of

    return filename_of(resp, default)


def _save(api: Api, path: str, out_dir: Path, default: str, verify: bool) -> Path | None:
    with api.http.stream("GET", path) as resp:
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            resp.read()
            raise ClientError(describe_problem(resp))
        target = out_dir / _filename(resp, default)
        digest = hashlib.sha256()
        tmp = target.with_name(target.name + ".part")
        with open(tmp, "wb") as fh:
            for chunk in resp.iter_bytes():
                digest.update(chunk)
                fh.write(chunk)
        # the API's ETag is the sha256; after a redirect the bucket's own ETag (an MD5) is not
        etag = (resp.history[0] if resp.history else resp).headers.get("etag", "").strip('"')
    if verify and etag and etag != digest.hexdigest():
        tmp.unlink(missing_ok=True)
        raise ClientError(f"{path}: sha256 {digest.hexdigest()} does not match the server's ETag {etag}; "
                          "the download was corrupted, try again.")
    tmp.replace(target)
    return target


def jobs_download(api: Api, args: argparse.Namespace) -> int:
    job = api.json("GET", f"/v1/jobs/{args.job_id}")
    out = Path(args.out or job["id"])
    out.mkdir(parents=True, exist_ok=True)
    got = {
        "checkpoint": _save(api, f"/v1/jobs/{job['id']}/checkpoint", out, "checkpoint.safetensors", True),
        "report": _save(api, f"/v1/jobs/{job['id']}/report", out, "report.json", True),
        "plot": _save(api, f"/v1/jobs/{job['id']}/report.png", out, "report.png", True),
    }
    for kind, path in got.items():
        print(f"{kind:<10} {path if path else '(none yet)'}")
    if not any(got.values()):
        raise ClientError(f"job {job['id']} ({job['status']}) has nothing to download yet")
    if job.get("result"):
        print(result_table(job["result"]))
    return 0


# ------------------------------------------------------------------------------- parser
def build_parser(command: str) -> argparse.ArgumentParser:
    def options(suppress: bool) -> argparse.ArgumentParser:
        # The options work before or after the action; in the sub-parsers their defaults are
        # suppressed, or they would overwrite a value given before the action.
        p = argparse.ArgumentParser(add_help=False)
        kw: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
        p.add_argument("--url", **({"default": os.environ.get("ROBUSTIFY_URL", DEFAULT_URL)} | kw),
                       help=f"server URL (env ROBUSTIFY_URL, default {DEFAULT_URL})")
        p.add_argument("--key", **({"default": os.environ.get("ROBUSTIFY_API_KEY")} | kw),
                       help="API key rk_… (env ROBUSTIFY_API_KEY)")
        p.add_argument("--json", action="store_true", **kw, help="print the server's JSON")
        return p

    common = options(suppress=True)
    parser = argparse.ArgumentParser(prog=f"robustify {command}", parents=[options(suppress=False)])
    sub = parser.add_subparsers(dest="action", required=True)

    def add(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help)
        p.set_defaults(func=func)
        return p

    if command == "models":
        p = add("add", models_add, "register a RobustBench model")
        p.add_argument("name", help="RobustBench model name, e.g. Wang2023Better_WRN-28-10")
        p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "imagenet"])
        p.add_argument("--threat-model", default="Linf", choices=["Linf", "L2", "corruptions"])
        for q in (p, u := add("upload", models_upload, "upload safetensors weights")):
            q.add_argument("--wait", action="store_true", help="wait until validation has finished")
            q.add_argument("--wait-timeout", type=float, default=600.0)
        u.add_argument("file", help="a .safetensors state dict (pickle files are refused)")
        u.add_argument("--architecture", required=True,
                       help="small-cnn, preact-resnet-18, …, timm:<name>, torchvision:<name> (robustify architectures list)")
        u.add_argument("--num-classes", type=int, required=True)
        u.add_argument("--dataset", required=True, help="what it was trained on: digits, cifar10, … or a dataset id")
        u.add_argument("--name")
        h = add("hub", models_hub, "register a timm model from the Hugging Face Hub (read from the worker's HF cache)")
        h.add_argument("repo", help="the repository id, e.g. timm/resnet18.a1_in1k")
        h.add_argument("--revision")
        h.add_argument("--num-classes", type=int, required=True)
        h.add_argument("--dataset", required=True, help="what it was trained on: imagenet, cifar10, … or a dataset id")
        h.add_argument("--wait", action="store_true", help="wait until validation has finished")
        h.add_argument("--wait-timeout", type=float, default=600.0)
        for q in (u, h):
            q.add_argument("--input-size", "--input-shape", dest="input_size", type=_numbers(int),
                           help='C,H,W, e.g. "3,224,224" (default from the dataset)')
            q.add_argument("--mean", dest="input_mean", type=_numbers(float),
                           help="per-channel mean of the normalisation the model was trained with, "
                                'e.g. "0.485,0.456,0.406"')
            q.add_argument("--std", dest="input_std", type=_numbers(float),
                           help='per-channel std, e.g. "0.229,0.224,0.225"')
            q.add_argument("--metadata", help="a JSON object")
        add("list", models_list, "list models")
    elif command == "datasets":
        p = add("upload", datasets_upload, "upload an .npz (x uint8 images, y int labels) or a .zip / .tar of "
                                           "class folders")
        p.add_argument("file")
        p.add_argument("--name")
        p.add_argument("--image-size", help="archives: resize to S or H,W (cover and centre-crop)")
        p.add_argument("--channels", type=int, choices=[1, 3], help="archives: 1 grayscale or 3 RGB (default 3)")
        p.add_argument("--test-fraction", type=float, help="archives of class folders: held-out share (0.2)")
        p.add_argument("--seed", type=int, help="archives of class folders: seed of the split (0)")
        add("list", datasets_list, "list data sets")
    elif command == "architectures":
        p = add("list", architectures_list, "the built-ins and families, or a family's names")
        p.add_argument("--family", choices=["builtin", "timm", "torchvision", "robustbench"])
        p.add_argument("--q", help="part of a name, or a pattern with * and ?")
    elif command == "jobs":
        p = add("submit", jobs_submit, "submit a fine-tune or evaluation job")
        p.add_argument("--type", choices=["finetune", "evaluate"], default="finetune")
        p.add_argument("--model", required=True, help="a model id, or robustbench:<name>")
        p.add_argument("--dataset", required=True, help="digits, fashion-mnist, cifar10, cifar100 or a dataset id")
        p.add_argument("--threat-model", choices=["w2-linf", "w2-l2", "linf", "l2"])
        p.add_argument("--delta", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--config", help="recipe fields as a JSON object")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="one recipe field (repeatable)")
        p.add_argument("--metadata", help="a JSON object")
        p.add_argument("--idempotency-key")
        p.add_argument("--watch", action="store_true", help="then follow it with a progress bar")
        p = add("list", jobs_list, "list recent jobs")
        p.add_argument("--status")
        p.add_argument("--limit", type=int, default=20)
        for name, func, text in (("status", jobs_status, "show a job"), ("watch", jobs_watch, "follow a job live"),
                                 ("cancel", jobs_cancel, "cancel a job")):
            add(name, func, text).add_argument("job_id")
        p = add("download", jobs_download, "save the best checkpoint and the report (sha256 verified)")
        p.add_argument("job_id")
        p.add_argument("--out", help="folder (default: the job id)")
    return parser


def main(argv: list[str], http: httpx.Client | None = None) -> int:
    """argv[0] is models, datasets, jobs or architectures. `http` lets tests pass a client of their own."""
    command, rest = argv[0], argv[1:]
    args = build_parser(command).parse_args(rest)
    api = Api(args.url, args.key, http)
    try:
        return int(args.func(api, args) or 0)
    except ClientError as exc:
        print(f"robustify {command} {args.action}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if http is None:
            api.http.close()
