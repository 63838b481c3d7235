"""`robustify serve | worker | migrate | keys`: run and administer the service.

serve    migrations, then the API (uvicorn, factory api.app:create_app), one worker process for jobs
         (the gpu queue) and one for model validation (the cpu queue), so a registration never waits
         behind a long job; Ctrl-C or SIGTERM stops them within about 15 s (a running job is
         checkpointed and handed back), and the workers also stop if `serve` itself is killed. The worker's job
         lines (claimed, epoch done, succeeded/failed) show; access-log lines only with --access-log.
worker   a Celery worker against ROBUSTIFY_DATABASE_URL / ROBUSTIFY_BROKER_URL (one per GPU);
         SIGTERM checkpoints its running job, hands it back to the queue and exits.
migrate  alembic upgrade head on ROBUSTIFY_DATABASE_URL (or the embedded SQLite file).
keys     create NAME (prints the key once) | list | revoke ID_OR_PREFIX
health   api (the server at --url answers /readyz) | worker (a worker on this host beat recently):
         exit status 0 when healthy, for container health checks
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from cli.params import CONTEXT

if TYPE_CHECKING:
    from core.service.settings import Settings


def _settings(data_dir: Path | None = None, *, reread: bool = False) -> Settings:
    # imported here: `robustify health api` runs in a client-only install, without pydantic-settings
    from core.service.settings import get_settings

    if data_dir is not None:
        os.environ["ROBUSTIFY_DATA_DIR"] = str(data_dir)
    if data_dir is not None or reread:
        get_settings.cache_clear()
    return get_settings()


def migrate(settings: Settings) -> None:
    import migrations

    if settings.is_embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.resolved_database_url)


# ------------------------------------------------------------------------------ worker
def worker_argv(queues: str, concurrency: int, pool: str, name: str | None, loglevel: str,
                quiet: bool = False) -> list[str]:
    argv = (["--quiet"] if quiet else []) + ["worker", "--queues", queues, "--concurrency", str(concurrency),
                                             "--pool", pool, "--prefetch-multiplier", "1", "--loglevel", loglevel,
                                             "--without-gossip", "--without-mingle"]
    if name:
        argv += ["--hostname", name]
    return argv


def run_worker(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        # one worker process per GPU: this process and its pool child see only that device
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
        args.name = args.name or f"gpu{args.gpu}@%h"
    settings = _settings(args.data_dir)
    if args.migrate:
        migrate(settings)
    queues = args.queues or f"{settings.gpu_queue},{settings.cpu_queue}"
    if args.quiet:  # embedded use (serve, demo): no banner, no root-user lecture
        import warnings

        warnings.filterwarnings("ignore", message=".*superuser privileges.*")
    import worker.celery_app as celery_app
    from worker.celery_app import app

    celery_app.quiet_libraries = args.quiet  # set before worker_main configures logging
    if args.parent_pid:
        _exit_with_parent(args.parent_pid)
    app.worker_main(worker_argv(queues, args.concurrency, args.pool, args.name, args.loglevel, args.quiet))
    return 0


def _exit_with_parent(parent_pid: int) -> None:
    """Stop this worker (warm: its running job is handed back) once the process that started it is
    gone, even if that process was SIGKILLed and could not stop it."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def start_worker_process(queues: str, *, env: dict[str, str] | None = None, loglevel: str = "INFO",
                         name: str | None = None, quiet: bool = False, log_path: Path | None = None
                         ) -> subprocess.Popen:
    """A `robustify worker` subprocess in its own process group (so it can be stopped as a whole)
    that stops by itself when this process dies."""
    cmd = [sys.executable, "-m", "cli", "worker", "--queues", queues, "--loglevel", loglevel,
           "--parent-pid", str(os.getpid())]
    if name:
        cmd += ["--name", name]
    if quiet:
        cmd.append("--quiet")
    if log_path is None:
        return subprocess.Popen(cmd, env=env or dict(os.environ), start_new_session=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, env=env or dict(os.environ), start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)


def wait_or_kill(proc: subprocess.Popen, grace: float) -> bool:
    """Wait up to `grace` seconds for `proc` to exit, else SIGKILL its group; whether it exited."""
    try:
        proc.wait(timeout=max(grace, 0.0))
        return True
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    # only a process stuck in the kernel outlives SIGKILL; nothing more to do from here
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)
    return False


# ------------------------------------------------------------------------------ serve
# How `serve` stops (SIGTERM or Ctrl-C): the API and the workers stop side by side. The API
# finishes its open requests (event streams end at once) within API_GRACE_SECONDS; the job worker
# hands its running job back (a checkpoint, then the queue) and exits, the validation worker
# finishes its check (seconds) or leaves its message in the queue; one still there after
# WORKER_STOP_SECONDS is killed, and its job resumes from its last checkpoint when a worker next
# starts. So `serve` is gone within about 15 s.
API_GRACE_SECONDS = 5
WORKER_STOP_SECONDS = 10.0


class EmbeddedService:
    """The API server and two worker processes; used by `serve` and by `demo`.

    `worker` runs the jobs (the gpu queue, one at a time); `validator` validates registered models
    (the cpu queue), so that a registration is ready in seconds while a long job runs. Both are
    `robustify worker` processes (a Celery parent and one pool process each)."""

    def __init__(self, settings: Settings, host: str, port: int, *, worker_loglevel: str = "INFO",
                 worker_log: Path | None = None) -> None:
        self.settings, self.host, self.port = settings, host, port
        self.worker_log = worker_log
        self.worker_loglevel = worker_loglevel
        self.worker: subprocess.Popen | None = None
        self.validator: subprocess.Popen | None = None
        self.server: Any = None
        self._worker_signalled: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def workers(self) -> list[subprocess.Popen]:
        return [w for w in (self.worker, self.validator) if w is not None]

    def start_worker(self) -> None:
        """Start the job worker and the validation worker."""
        env = dict(os.environ)
        env["ROBUSTIFY_DATA_DIR"] = str(self.settings.data_dir)
        quiet = self.worker_loglevel.upper() != "DEBUG"
        self.worker = start_worker_process(self.settings.gpu_queue, env=env, loglevel=self.worker_loglevel,
                                           name=f"embedded-{os.getpid()}@%h", quiet=quiet, log_path=self.worker_log)
        self.validator = start_worker_process(self.settings.cpu_queue, env=env, loglevel=self.worker_loglevel,
                                              name=f"embedded-{os.getpid()}-validation@%h", quiet=quiet,
                                              log_path=self.worker_log)

    def make_server(self, log_level: str = "warning", access_log: bool = False) -> Any:
        import uvicorn

        service = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                service.signal_worker()  # its hand-back runs while the API finishes its requests
                super().handle_exit(sig, frame)

        config = uvicorn.Config("api.app:create_app", factory=True, host=self.host, port=self.port,
                                log_level=log_level, access_log=access_log,
                                timeout_graceful_shutdown=API_GRACE_SECONDS)
        self.server = Server(config)
        return self.server

    def signal_worker(self) -> None:
        """Start the workers' warm shutdown (once; safe in a signal handler): SIGTERM to each main
        process, which passes it on to the pool process running a job (checkpointed, handed back).

        Not to its process group: that kills the idle pool process too. One killed while it holds
        the pool's shared queue lock leaves the worker waiting for that lock at exit for ever
        (billiard's Pool._help_stuff_finish: how `serve` hung here), and the pool forks a
        replacement into the stopping worker on every stop besides."""
        if not self.workers or self._worker_signalled is not None:
            return
        self._worker_signalled = time.monotonic()
        for proc in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)

    def stop_worker(self) -> None:
        """Wait for the workers' warm shutdown, up to WORKER_STOP_SECONDS after it began; then kill them."""
        if all(proc.poll() is not None for proc in self.workers):
            return
        self.signal_worker()
        for proc in self.workers:
            left = WORKER_STOP_SECONDS - (time.monotonic() - (self._worker_signalled or time.monotonic()))
            if not wait_or_kill(proc, left):
                print(f"robustify: a worker did not stop within {WORKER_STOP_SECONDS:.0f} s and was killed; a job it "
                      "was running resumes from its last checkpoint when a worker next starts.", file=sys.stderr,
                      flush=True)

    def watch_worker(self) -> None:
        """Stop the API when a worker process dies: a service that never runs jobs (or never validates
        a model) must not look up."""
        import threading

        def watch() -> None:
            while self.server is not None and not self.server.should_exit:
                dead = [proc for proc in self.workers if proc.poll() is not None]
                if dead:
                    print(f"robustify: a worker process exited (code {dead[0].returncode}); stopping. "
                          "See its log above.", file=sys.stderr, flush=True)
                    self.server.should_exit = True
                    return
                time.sleep(1.0)

        threading.Thread(target=watch, name="worker-watch", daemon=True).start()


def run_serve(args: argparse.Namespace) -> int:
    settings = _settings(args.data_dir)
    host = args.host or settings.host
    port = args.port or settings.port
    os.environ["ROBUSTIFY_HOST"] = host
    settings = _settings(reread=True)
    migrate(settings)
    svc = EmbeddedService(settings, host, port, worker_loglevel=args.worker_loglevel)
    server = svc.make_server(args.log_level, access_log=args.access_log)
    if not args.no_worker:
        svc.start_worker()
        svc.watch_worker()
    where = f"data in {settings.data_dir.resolve()}" if settings.is_embedded else "database from ROBUSTIFY_DATABASE_URL"
    print(f"robustify serving on {svc.url}  (dashboard: {svc.url}/ui/; API docs: {svc.url}/docs; {where}; "
          "Ctrl-C stops)", flush=True)
    # uvicorn handles SIGINT/SIGTERM, then re-raises the signal to the handler it found here:
    # make that a no-op so the worker is still stopped below (the default would kill us first).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        svc.stop_worker()
        print("robustify stopped.", flush=True)
    return 0 if all(w.returncode in (0, -signal.SIGTERM, -signal.SIGKILL) for w in svc.workers) else 1


# ------------------------------------------------------------------------------ migrate, keys
def run_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args.data_dir)
    migrate(settings)
    print(f"database at head: {_redact(settings.resolved_database_url)}")
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def run_keys(args: argparse.Namespace) -> int:
    from core.service.apikeys import create_api_key, list_api_keys, revoke_api_key
    from core.service.sessions import make_engine, make_sessionmaker

    settings = _settings(args.data_dir)
    migrate(settings) if settings.is_embedded else None
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as s:
            if args.action == "create":
                if not args.name:
                    print("robustify keys create: give a NAME", file=sys.stderr)
                    return 2
                row, plaintext = create_api_key(s, args.name)
                s.commit()
                print(plaintext)
                print(f"(key {row.id} '{row.name}'; shown once, store it now)", file=sys.stderr)
            elif args.action == "list":
                for row in list_api_keys(s):
                    state = "revoked" if row.revoked_at else "active"
                    print(f"{row.id}  {row.prefix}…  {state:8s} {row.created_at:%Y-%m-%d %H:%M}  {row.name}")
            else:
                if not args.name:
                    print("robustify keys revoke: give the key id or its prefix", file=sys.stderr)
                    return 2
                ok = revoke_api_key(s, args.name)
                s.commit()
                if not ok:
                    print(f"no active key {args.name!r}", file=sys.stderr)
                    return 1
                print(f"revoked {args.name}")
    finally:
        engine.dispose()
    return 0


# ------------------------------------------------------------------------------ health
def run_health(args: argparse.Namespace) -> int:
    """For container health checks: 0 when the API is ready / a worker on this host beats."""
    if args.target == "api":
        import httpx

        try:
            r = httpx.get(f"{args.url.rstrip('/')}/readyz", timeout=5)
        except httpx.HTTPError as exc:
            print(f"robustify health api: {args.url} does not answer ({exc})", file=sys.stderr)
            return 1
        if r.status_code != 200:
            print(f"robustify health api: not ready: {r.text[:1000]}", file=sys.stderr)
            return 1
        return 0
    from datetime import timedelta

    from sqlalchemy import select

    from core.service.db import WorkerHeartbeat, utcnow
    from core.service.sessions import make_engine, make_sessionmaker

    settings = _settings(args.data_dir)
    since = utcnow() - timedelta(seconds=settings.stale_heartbeat_seconds)
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as s:
            names = list(s.scalars(select(WorkerHeartbeat.id).where(WorkerHeartbeat.heartbeat_at >= since)))
    except Exception as exc:
        print(f"robustify health worker: the database does not answer ({type(exc).__name__})", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    host = socket.gethostname()
    if not any(n.endswith(f"@{host}") for n in names):
        print(f"robustify health worker: no worker on {host} beat in the last "
              f"{settings.stale_heartbeat_seconds:g} s", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------ entry
_DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False),
                         help="The embedded data folder: SQLite database, artifacts, data sets "
                              "(default ROBUSTIFY_DATA_DIR or ./robustify-data).")


@click.command(context_settings=CONTEXT)
@_DATA_DIR
@click.option("--host", help="Interface to listen on (default ROBUSTIFY_HOST or 127.0.0.1; another than "
                             "localhost requires API keys).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default ROBUSTIFY_PORT or 8000).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="The API server's log level.")
@click.option("--access-log", is_flag=True, help="Log every HTTP request (off by default).")
@click.option("--worker-loglevel", default="INFO", show_default=True,
              type=click.Choice(["ERROR", "WARNING", "INFO", "DEBUG"], case_sensitive=False),
              help="The worker's: INFO shows each job's lifecycle; DEBUG adds Celery's own lines.")
@click.option("--no-worker", is_flag=True, help="Run only the API (workers run elsewhere).")
def serve(**options: Any) -> int:
    """Run the API, one worker for jobs and one for model validation: migrations first, then all
    three until Ctrl-C.

    The embedded default needs nothing else: SQLite and a server-less broker in --data-dir.
    Ctrl-C or SIGTERM stops them within about 15 s (a running job is checkpointed and handed
    back); the workers also stop if `serve` itself is killed.
    """
    return run_serve(argparse.Namespace(**options))


@click.command(context_settings=CONTEXT)
@_DATA_DIR
@click.option("--queues", help="Comma-separated queues to consume (default: the gpu and cpu queues, "
                               "ROBUSTIFY_GPU_QUEUE and ROBUSTIFY_CPU_QUEUE).")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Job processes; keep 1 per GPU.")
@click.option("--pool", type=click.Choice(["prefork", "solo"]), default="prefork", show_default=True,
              help="Celery's pool: prefork runs each job in a child process.")
@click.option("--name", help="Celery hostname, e.g. gpu0@%h.")
@click.option("--gpu", type=click.IntRange(min=0), help="Pin this worker to one GPU (sets CUDA_VISIBLE_DEVICES).")
@click.option("--loglevel", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
@click.option("--migrate", is_flag=True, help="Apply database migrations first.")
@click.option("--quiet", is_flag=True, help="No start-up banner.")
@click.option("--parent-pid", type=int, hidden=True)  # stop when this process is gone
def worker(**options: Any) -> int:
    """Run a worker against ROBUSTIFY_DATABASE_URL and ROBUSTIFY_BROKER_URL (one per GPU).

    SIGTERM checkpoints its running job, hands it back to the queue and exits.
    """
    return run_worker(argparse.Namespace(**options))


@click.command("migrate", context_settings=CONTEXT)
@_DATA_DIR
def migrate_cmd(**options: Any) -> int:
    """Apply the database migrations (alembic upgrade head) to ROBUSTIFY_DATABASE_URL or the
    embedded SQLite file."""
    return run_migrate(argparse.Namespace(**options))


@click.group(context_settings=CONTEXT)
def keys() -> None:
    """Manage API keys in the database (run on the server's machine)."""


@keys.command("create", context_settings=CONTEXT)
@click.argument("name")
@_DATA_DIR
def keys_create(name: str, data_dir: Path | None) -> int:
    """Create a key called NAME and print it (once: only its hash is stored)."""
    return run_keys(argparse.Namespace(action="create", name=name, data_dir=data_dir))


@keys.command("list", context_settings=CONTEXT)
@_DATA_DIR
def keys_list(data_dir: Path | None) -> int:
    """List the keys: id, prefix, state, creation time and name."""
    return run_keys(argparse.Namespace(action="list", name=None, data_dir=data_dir))


@keys.command("revoke", context_settings=CONTEXT)
@click.argument("key")
@_DATA_DIR
def keys_revoke(key: str, data_dir: Path | None) -> int:
    """Revoke a key, named by its id or its prefix (rk_…)."""
    return run_keys(argparse.Namespace(action="revoke", name=key, data_dir=data_dir))


@click.command(context_settings=CONTEXT)
@click.argument("target", type=click.Choice(["api", "worker"]))
@click.option("--url", envvar="ROBUSTIFY_URL", default="http://127.0.0.1:8000", show_default=True,
              help="api: the server to ask (env ROBUSTIFY_URL, as for the client commands).")
@_DATA_DIR
def health(**options: Any) -> int:
    """Exit 0 when healthy, for container health checks: TARGET api (the server at --url answers
    /readyz) or worker (a worker on this host beat recently)."""
    return run_health(argparse.Namespace(**options))
