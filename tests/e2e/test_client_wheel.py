"""The client distribution as a user gets it: the wheel built from this repository, installed
without extras into a fresh virtual environment (no torch, no web stack), then its SDK and its
`robustify` client commands against a live `robustify serve`. And, in the development install,
the client commands import neither torch nor the service when they load."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ROOT, EmbeddedServe

pytestmark = pytest.mark.slow

# What `pip install robustify` may bring: the SDK's own dependencies and theirs, nothing of the server.
SERVER_ONLY = ("torch", "torchvision", "numpy", "fastapi", "uvicorn", "sqlalchemy", "celery", "pydantic-settings",
               "alembic", "boto3", "psycopg", "timm", "robustbench", "safetensors")
CLIENT_COMMANDS = ("models", "datasets", "jobs", "architectures", "webhooks", "health")


def _client_env() -> dict[str, str]:
    """The environment of a user's shell: nothing that points into this checkout or its venv."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ROBUSTIFY_", "PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env={**_client_env(), **env}, capture_output=True, text=True,
                          timeout=timeout)


def build_wheel(out: Path) -> Path:
    """`pip wheel` of a copy of the sources (so the build leaves no build/ or egg-info in the checkout)."""
    src = out / "src"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for name in (p.rstrip("*") for p in packages["include"]):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    done = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                 str(src)], cwd=out)
    assert done.returncode == 0, done.stderr
    [wheel] = out.glob("robustify-*.whl")
    return wheel


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the client wheel and what it depends on (from the package index or
    pip's cache)."""
    work = tmp_path_factory.mktemp("client-wheel")
    wheel = build_wheel(work)
    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=work)
    assert made.returncode == 0, made.stderr
    installed = _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], cwd=work, timeout=600)
    assert installed.returncode == 0, installed.stderr
    return venv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServe]:
    with EmbeddedServe(tmp_path_factory.mktemp("serve"), ready_timeout=90) as serve:
        yield serve


def robustify(venv: Path, *args: str, url: str = "", timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The `robustify` script of the client venv, run from outside the checkout."""
    env = {"ROBUSTIFY_URL": url} if url else {}
    return _run([str(venv / "bin" / "robustify"), *args], cwd=venv, timeout=timeout, **env)


def test_the_client_wheel_installs_without_torch_or_the_server(client_venv: Path) -> None:
    listed = _run([str(client_venv / "bin" / "pip"), "list", "--format", "json"], cwd=client_venv)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"robustify", "httpx", "pydantic", "click"} <= names, names
    assert not names & set(SERVER_ONLY), names & set(SERVER_ONLY)
    probe = _run([str(client_venv / "bin" / "python"), "-c",
                  "import importlib.util, pathlib, robustify; "
                  "print(importlib.util.find_spec('torch') is None, "
                  "(pathlib.Path(robustify.__file__).parent / 'py.typed').is_file(), robustify.__file__)"],
                 cwd=client_venv)
    no_torch, typed, where = probe.stdout.split()
    assert (no_torch, typed) == ("True", "True"), probe.stdout + probe.stderr
    assert where.startswith(str(client_venv)), where   # the installed SDK, not this checkout


@pytest.mark.parametrize("argv", [["serve"], ["finetune", "--epochs", "1"], ["keys", "create", "me"],
                                  ["health", "worker"]])
def test_server_commands_name_the_extra_they_need(client_venv: Path, argv: list[str]) -> None:
    done = robustify(client_venv, *argv)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "server_extra_missing" in done.stderr and 'pip install "robustify[server]"' in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_sdk_and_cli_of_the_client_install_against_a_live_server(client_venv: Path, server: EmbeddedServe,
                                                                  digits_model_file: Path) -> None:
    url = server.url
    assert robustify(client_venv, "health", "api", "--url", url).returncode == 0
    arch = robustify(client_venv, "architectures", "list", "--json", url=url)
    assert arch.returncode == 0, arch.stderr
    assert "small-cnn" in {a["id"] for a in json.loads(arch.stdout)["data"]}, arch.stdout

    # the CLI uploads a model and waits until a worker validated it
    uploaded = robustify(client_venv, "models", "upload", str(digits_model_file), "--architecture", "small-cnn",
                         "--num-classes", "10", "--dataset", "digits", "--input-size", "1,8,8", "--wait", "--json",
                         url=url)
    assert uploaded.returncode == 0, uploaded.stderr
    model = json.loads(uploaded.stdout)
    assert model["status"] == "ready", model

    # the SDK submits an evaluation (the quick preset: the SDK is the point here) and waits for it
    script = ("import json, sys, robustify\n"
              "with robustify.Client(sys.argv[1]) as c:\n"
              "    job = c.jobs.create(type='evaluate', model_id=sys.argv[2], dataset='digits',\n"
              "                        threat_model={'kind': 'w2-linf', 'delta': '1/10'},\n"
              "                        config={'n_examples': 64, 'wpgd_steps': 2, 'pgd_steps': 2,\n"
              "                                'evaluation': 'quick'})\n"
              "    job = c.jobs.wait(job.id, timeout=150)\n"
              "    print(json.dumps({'id': job.id, 'status': job.status, 'n': c.models.list().data[0].id}))\n")
    sdk = _run([str(client_venv / "bin" / "python"), "-c", script, url, model["id"]], cwd=client_venv, timeout=200)
    assert sdk.returncode == 0, sdk.stderr
    job: dict[str, Any] = json.loads(sdk.stdout)
    assert job["status"] == "succeeded" and job["n"] == model["id"], job

    # and the CLI reads the job back, with the engine's result in it
    got = robustify(client_venv, "jobs", "get", job["id"], "--json", url=url)
    assert got.returncode == 0, got.stderr
    shown = json.loads(got.stdout)
    assert shown["id"] == job["id"] and shown["status"] == "succeeded", shown
    summary = shown["result"]["summary"]
    assert 0.0 <= summary["w2_robust_accuracy"] <= summary["clean_accuracy"] <= 1.0, summary
    # the recipe fields come from the engine's pydantic config, which needs no torch
    fields = robustify(client_venv, "jobs", "fields", "evaluate")
    assert fields.returncode == 0 and "wpgd_steps" in fields.stdout, fields.stderr


def test_client_commands_load_without_torch_or_the_service() -> None:
    """In the full install too: the client commands (and their --help) import neither torch, nor the
    engine, nor the service's web stack."""
    heavy = ("torch", "numpy", "core", "api", "worker", "fastapi", "sqlalchemy", "celery", "pydantic_settings")
    probe = (
        "import contextlib, io, sys\n"
        "from cli.main import main\n"
        f"for name in {CLIENT_COMMANDS!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main([name, '--help']) == 0, name\n"
        f"print(sorted({{m for m in sys.modules if m.partition('.')[0] in {heavy!r}}}))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
