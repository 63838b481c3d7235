"""Error codes are one vocabulary: core.errors.ErrorCode spells each once, the server's code
names them through it, and the HTTP API's page lists them all."""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from core.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[2]
# The server: where a code reaches a problem response or a job's or model's `error`.
SERVER = ("api", "worker", "core/service", "core/storage", "core/errors.py")


def _string(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _code_literals(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, code) of every string written where a code goes: ApiError(status, code, ...),
    problem(status, code, ...), problem_response(request, status, code, ...), code=...,
    {"code": ...} and a class's `code = ...`."""
    positions = {"ApiError": 1, "problem": 1, "problem_response": 2}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            at = positions.get(name)
            if at is not None and len(node.args) > at and _string(node.args[at]):
                yield node.lineno, str(_string(node.args[at]))
            yield from ((node.lineno, str(_string(k.value))) for k in node.keywords
                        if k.arg == "code" and _string(k.value))
        elif isinstance(node, ast.Dict):
            yield from ((node.lineno, str(_string(v))) for k, v in zip(node.keys, node.values, strict=True)
                        if _string(k) == "code" and _string(v))
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                targets = stmt.targets if isinstance(stmt, ast.Assign) else []
                if any(isinstance(t, ast.Name) and t.id == "code" for t in targets) and _string(stmt.value):
                    yield stmt.lineno, str(_string(stmt.value))


def _server_files() -> Iterator[Path]:
    for part in SERVER:
        path = ROOT / part
        yield from (sorted(path.rglob("*.py")) if path.is_dir() else [path])


def test_each_code_is_spelled_once() -> None:
    values = [member.value for member in ErrorCode.__members__.values()]   # aliases included
    assert len(values) == len(set(values)), "two ErrorCode names share one code"
    assert all(v == v.lower() and " " not in v for v in values)


def test_the_server_names_codes_through_error_code() -> None:
    spelled = [f"{path.relative_to(ROOT)}:{line}: {code!r}"
               for path in _server_files() for line, code in _code_literals(ast.parse(path.read_text()))]
    assert not spelled, "codes written as strings (use core.errors.ErrorCode):\n" + "\n".join(spelled)


def test_the_scan_sees_a_code_written_as_a_string() -> None:
    """The scan above would catch each way of writing a code (so its silence means something)."""
    source = '''
raise ApiError(404, "not_found", "x")
problem(503, "service_busy", "x", instance="/")
problem_response(request, 503, "not_ready", "x")
RobustifyError("x", code="worker_lost")
error = {"code": "internal_error", "message": "x"}
class Full(RobustifyError):
    code = "storage_full"
'''
    assert sorted(code for _, code in _code_literals(ast.parse(source))) == sorted(
        ["not_found", "service_busy", "not_ready", "worker_lost", "internal_error", "storage_full"])


def test_the_http_api_page_lists_every_code() -> None:
    page = (ROOT / "docs" / "http-api.md").read_text()
    missing = [code.value for code in ErrorCode if f"`{code.value}`" not in page]
    assert not missing, f"docs/http-api.md does not list {missing}"
