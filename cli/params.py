"""What the commands share: value types that parse the way people write values (radii such as
8/255, lists such as 3,224,224, JSON objects), the recipe fields behind --set and --config, and
the errors that end a command with one line instead of a traceback."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
THREAT_KINDS = ("w2-linf", "w2-l2", "linf", "l2")
RECIPES = ("finetune", "evaluate")
_FRACTION = re.compile(r"^\s*-?\d+(\.\d+)?\s*/\s*\d+(\.\d+)?\s*$")


class Failure(click.ClickException):
    """A command that cannot go on: one line (`code: message`) on stderr and exit status 1
    (2 for input that was wrong from the start, as click's own usage errors)."""

    def __init__(self, message: str, code: str | None = None, exit_code: int = 1) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it from the instance

    def show(self, file: Any = None) -> None:
        ctx = click.get_current_context(silent=True)
        where = ctx.command_path if ctx is not None else "robustify"
        click.echo(f"{where}: {self.format_message()}", err=True)


# ------------------------------------------------------------------------------ value types
class Radius(click.ParamType):
    """A radius δ: a number (0.031) or a fraction (8/255), in pixel units of [0, 1] images."""

    name = "radius"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        from robustify.radius import parse_radius

        try:
            return parse_radius(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Numbers(click.ParamType):
    """A list written "3,224,224", "3x224x224" or "[3, 224, 224]"; radii may be fractions."""

    def __init__(self, kind: str = "float") -> None:
        self.kind = kind
        self.name = {"int": "N,N,…", "float": "X,X,…", "radius": "R,R,…"}[kind]

    def convert(self, value: Any, param: Any, ctx: Any) -> list[Any]:
        if isinstance(value, list):
            return value
        parts = [p for p in str(value).strip().strip("[]").replace("x", ",").split(",") if p.strip()]
        try:
            if self.kind == "radius":
                return [Radius().convert(p, param, ctx) for p in parts]
            return [int(p) if self.kind == "int" else float(p) for p in parts]
        except ValueError:
            what = "whole numbers" if self.kind == "int" else "numbers"
            self.fail(f"{value!r}: give {what} separated by commas, e.g. "
                      f"{'3,224,224' if self.kind == 'int' else '0.485,0.456,0.406'}", param, ctx)


class JsonObject(click.ParamType):
    """A JSON object, inline ('{"a": 1}') or in a file (@file.json, or a path ending .json)."""

    name = "JSON"

    def convert(self, value: Any, param: Any, ctx: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        text = str(value)
        source = "the value"
        if text.startswith("@") or (not text.lstrip().startswith("{") and text.endswith(".json")):
            path = Path(text.removeprefix("@"))
            try:
                text, source = path.read_text(), str(path)
            except OSError as exc:
                self.fail(f"cannot read {path}: {exc.strerror or exc}", param, ctx)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            self.fail(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", param, ctx)
        if not isinstance(obj, dict):
            self.fail(f"{source} must be a JSON object ({{...}}), not {type(obj).__name__}", param, ctx)
        return obj


def field_value(text: str) -> Any:
    """--set's VALUE: JSON when it parses (3, 0.5, true, [1,2], "x"), a fraction such as 8/255 as
    its number, else the text itself."""
    if _FRACTION.match(text):
        from robustify.radius import parse_radius

        return parse_radius(text.replace(" ", ""))
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def recipe_fields(config: dict[str, Any] | None, assignments: tuple[str, ...], recipe: str) -> dict[str, Any]:
    """--config's object updated by each --set FIELD=VALUE, checked against the recipe's field
    names (an unknown field is a usage error naming the known ones)."""
    fields = dict(config or {})
    for item in assignments:
        if item.strip() in ("help", "?"):
            click.echo(fields_help(recipe))
            raise click.exceptions.Exit(0)
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"expected FIELD=VALUE, got {item!r} (`--set help` lists the fields)",
                                     param_hint="--set")
        fields[key] = field_value(value.strip())
    known = recipe_model(recipe).model_fields
    unknown = sorted(set(fields) - set(known))
    if unknown:
        named = ", ".join(f"{name}{close_name_hint(name, known)}" for name in unknown)
        raise click.BadParameter(f"unknown {recipe} field{'s' if len(unknown) > 1 else ''} {named}; "
                                 f"`robustify jobs fields {recipe}` lists them", param_hint="--set/--config")
    return fields


def close_name_hint(name: str, known: Iterable[str]) -> str:
    """" (did you mean epochs?)" for a name close to a known one (a typo, a missing s), else ""."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.75)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def require(**options: Any) -> tuple[Any, ...]:
    """The values of options a command needs, checked in the command itself rather than by click
    (`required=True`), so that `--set help` answers without them; a missing one is click's usage
    error ("Missing option '--model'", exit status 2)."""
    for name, value in options.items():
        if value is None:
            raise click.UsageError(f"Missing option '--{name.replace('_', '-')}'.")
    return tuple(options.values())


def recipe_model(recipe: str) -> Any:
    from core.engine.config import EvaluateConfig, FinetuneConfig

    return {"finetune": FinetuneConfig, "evaluate": EvaluateConfig}[recipe]


def _schema_type(schema: dict[str, Any]) -> str:
    """A JSON schema as a short type: int ≥ 1 | "auto", list[float], "pgd" | "autoattack"."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(_schema_type(s) for s in schema[key])
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = {"integer": "int", "number": "float", "boolean": "bool", "string": "str", "null": "null"}.get(
        schema.get("type", ""), schema.get("type", "any"))
    if kind == "array":
        return f"list[{_schema_type(schema.get('items', {}))}]"
    bounds = [f"{op} {schema[key]:g}" for key, op in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                       ("maximum", "≤"), ("exclusiveMaximum", "<")) if key in schema]
    return f"{kind} {' '.join(bounds)}" if bounds else kind


def fields_help(recipe: str) -> str:
    """The recipe's fields with type, default and description, from the pydantic model."""
    model = recipe_model(recipe)
    props = model.model_json_schema()["properties"]
    lines = [f"{recipe} recipe fields (--set FIELD=VALUE, or --config with a JSON object of them):", ""]
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if hasattr(default, "model_dump"):
            default = default.model_dump(mode="json")
        lines.append(f"  {name}  ({_schema_type(props[name])}, default {json.dumps(default, default=str)})")
        if info.description:
            lines.append(f"      {info.description}")
    return "\n".join(lines)
