"""docker-compose.yml and the Dockerfile, without a Docker daemon: every robustify service is built
from the repository and runs the image's entrypoint (`tini -- robustify`), so the commands the
files give (and the one-off `docker compose run --rm api keys create me`) are robustify commands;
here those commands run for real against PostgreSQL and Redis."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
import yaml

from core.service.db import WorkerHeartbeat, record_worker_heartbeat
from tests.service.conftest import REDIS_URL, free_port

ROOT = Path(__file__).resolve().parents[2]


def _accepted(argv: list[str]) -> None:
    """Parse `robustify argv` as the CLI would (a click usage error if it is not accepted)."""
    from cli.main import cli

    command: Any = cli
    while isinstance(command, click.Group):
        name, argv = argv[0], argv[1:]
        command = command.get_command(click.Context(command), name)
    with command.make_context(name, list(argv)):
        pass
COMMANDS = ("serve", "worker", "migrate", "keys", "health")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _dockerfile(instruction: str) -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    return json.loads(re.search(rf"^{instruction} (\[.*\])$", text, re.M).group(1))


def _robustify(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """What the image runs for `args`: its entrypoint is `tini -- robustify`."""
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def env(pg_url: str, queues: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    env.update(ROBUSTIFY_DATABASE_URL=pg_url, ROBUSTIFY_BROKER_URL=REDIS_URL, ROBUSTIFY_GPU_QUEUE=queues.gpu,
               ROBUSTIFY_CPU_QUEUE=queues.cpu, ROBUSTIFY_DATA_DIR=str(tmp_path_factory.mktemp("compose-data")),
               PYTHONPATH=str(ROOT))
    return env


def test_every_robustify_service_is_built_here_and_runs_a_robustify_command(compose):
    assert _dockerfile("ENTRYPOINT") == ["/usr/bin/tini", "--", "robustify"]
    _accepted(_dockerfile("CMD"))
    healthcheck = re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert json.loads(healthcheck.group(1)) == ["robustify", "health", "api"]
    services = {name: s for name, s in compose["services"].items() if s.get("image") == "robustify:latest"}
    assert set(services) == {"migrate", "api", "worker", "validator"}
    for name, service in services.items():
        assert service.get("build") == ".", name  # never pulled from a registry
        assert "entrypoint" not in service, name  # `docker compose run --rm SERVICE keys ...` must work
        command = service["command"]
        assert command[0] in COMMANDS, (name, command)
        _accepted(command)  # arguments the CLI accepts
        if "healthcheck" in service:
            test = service["healthcheck"]["test"]
            assert test[:3] == ["CMD", "robustify", "health"], (name, test)
            _accepted(test[2:])
    assert services["api"]["healthcheck"]["test"][3] == "api"
    assert services["worker"]["healthcheck"]["test"][3] == "worker"
    assert services["validator"]["healthcheck"]["test"][3] == "worker"
    grace = services["worker"]["stop_grace_period"]
    assert int(grace.rstrip("s")) >= 30  # time to checkpoint and hand a job back
    header = (ROOT / "docker-compose.yml").read_text()
    assert "docker compose run --rm api keys create me" in header


def _queues(command: list[str]) -> set[str]:
    return set(command[command.index("--queues") + 1].split(","))


def test_jobs_and_model_validation_have_workers_of_their_own(compose):
    """Jobs (the gpu queue) go to the GPU worker, model validation (the cpu queue) to the validator, so a
    registration never waits behind a long job; the validator takes no GPU."""
    services = compose["services"]
    assert _queues(services["worker"]["command"]) == {"gpu"}
    assert _queues(services["validator"]["command"]) == {"cpu"}
    assert "deploy" not in services["validator"] and services["validator"]["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    names = {services[s]["command"][services[s]["command"].index("--name") + 1] for s in ("worker", "validator")}
    assert len(names) == 2   # one heartbeat row each


def test_keys_create_as_documented(env):
    out = _robustify(["keys", "create", "me"], env)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"rk_[A-Za-z0-9_-]{20,}", out.stdout.strip()), out.stdout


def test_api_service_command_and_its_readiness_check(compose, env, pg_url, db):
    """The api service's command serves the API (keys required on 0.0.0.0); its health check says
    not ready until a worker beats, ready after; SIGTERM stops it."""
    command = compose["services"]["api"]["command"]
    port = free_port()
    command = [*command[:command.index("--port") + 1], str(port)]
    proc = subprocess.Popen([sys.executable, "-m", "cli", *command], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    health = [*compose["services"]["api"]["healthcheck"]["test"][3:4], "--url", url]
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.1)
        assert httpx.get(f"{url}/v1/jobs", timeout=5).status_code == 401
        not_ready = _robustify(["health", *health], env)
        # not ready: no worker beat yet (which check failed is shown only to a key or the operator token)
        assert not_ready.returncode == 1 and "not_ready" in not_ready.stderr, not_ready.stderr
        worker = f"gpu0@{socket.gethostname()}"
        with db.Session() as s:
            record_worker_heartbeat(s, worker, ["gpu"])
            s.commit()
        try:
            assert _robustify(["health", *health], env).returncode == 0
            # ROBUSTIFY_URL, as the client commands read it, when --url is not given
            assert _robustify(["health", "api"], {**env, "ROBUSTIFY_URL": url}).returncode == 0
            worker_check = compose["services"]["worker"]["healthcheck"]["test"][3:]
            assert _robustify(["health", *worker_check], env).returncode == 0  # this host's worker beats
        finally:
            with db.Session() as s:
                s.delete(s.get(WorkerHeartbeat, worker))
                s.commit()
        stale = _robustify(["health", *worker_check], env)
        assert stale.returncode == 1 and "no worker" in stale.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _requirements(names: list[str]) -> list[Any]:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    return [Requirement(r) for name in names for r in groups[name]]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_ranges_in_pyproject_and_the_exact_versions_ci_and_the_image_install():
    """pyproject.toml states ranges (torch is not pinned, so the SDK fits any environment); constraints.txt
    pins one version of every dependency inside its range; the Makefile and the Dockerfile install with it."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_canonical(name)] = version.strip()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"   # what installs offline here
    for req in _requirements(["", "server", "test", "docs", "dev"]):
        name = _canonical(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt: {name}=={pins[name]} ∉ {req}"
    for req in _requirements(["", "server"]):   # what users install: ranges, never one exact version
        assert not any(s.operator == "==" for s in req.specifier), req
    assert {_canonical(r.name) for r in _requirements([""])} == {"httpx", "pydantic", "click", "tqdm"}

    assert re.search(r'^\t\$\(BIN\)/pip install .*-c constraints\.txt -e "\.\[server,', (ROOT / "Makefile").read_text(),
                     re.M)
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"^RUN (?:.*&& )?pip install (.*?)(?: &&|$)", dockerfile, re.M)
    assert installs and all(i.startswith("-c constraints.txt ") for i in installs), installs
    assert "COPY pyproject.toml README.md constraints.txt ./" in dockerfile
    # every package of the distribution is copied into the image before `pip install .`
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for package in (p.rstrip("*") for p in find["include"]):
        assert f"COPY {package} ./{package}\n" in dockerfile, package
