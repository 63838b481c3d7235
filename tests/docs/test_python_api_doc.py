"""docs/python-api.md matches robustify.engine: its code parses, imports what the module exports,
and calls evaluate/finetune only with arguments they take (their parameters or a job config's
fields); every argument its table names is one. The functions themselves: tests/core/test_engine_api.py."""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import robustify.engine
from core.engine.config import EvaluateConfig, FinetuneConfig

PAGE = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"
ACCEPTS = {"evaluate": (robustify.engine.evaluate, EvaluateConfig),
           "finetune": (robustify.engine.finetune, FinetuneConfig)}


def _accepted(name: str) -> set[str]:
    function, config = ACCEPTS[name]
    return set(inspect.signature(function).parameters) | set(config.model_fields)


def _blocks() -> list[ast.Module]:
    return [ast.parse(code) for code in re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)]


def test_the_pages_code_uses_only_what_the_engine_offers() -> None:
    blocks = _blocks()
    assert len(blocks) >= 2
    calls = 0
    for tree in blocks:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "robustify.engine":
                assert {a.name for a in node.names} <= set(robustify.engine.__all__), ast.dump(node)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ACCEPTS:
                calls += 1
                unknown = {k.arg for k in node.keywords} - _accepted(node.func.id)
                assert not unknown, f"{node.func.id}() does not take {unknown}"
    assert calls >= 3


def test_every_argument_the_tables_name_is_taken() -> None:
    text = PAGE.read_text()
    table = text.split("## `evaluate(")[1].split("## `finetune(")[0]
    named = set(re.findall(r"^\| `(\w+)`", table, re.M)) | set(re.findall(r"^\| `\w+`, `(\w+)`", table, re.M))
    assert {"data", "threat", "delta", "deltas", "input_mean", "input_std", "progress"} <= named
    assert named <= _accepted("evaluate") | {"data"}, named - _accepted("evaluate")
