"""pydantic's validation errors as one line that names the field and the fix.

The fix is the field's ``description`` in the JSON Schema (``<field> must be <description>,
got <value>``); checks that need their own words raise ``ValueError(text)``, used as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["one_line"]


def one_line(err: ValidationError, values: Mapping[str, Any], model: type[BaseModel]) -> str:
    """The first problem of ``err`` (raised validating ``values`` as ``model``), in one line.

    Unknown fields (typos) come first; the other fields with problems are counted.
    """
    schema = _schema(model)
    problems = err.errors(include_url=False)
    unknown = [p["loc"] for p in problems if p["type"] == "extra_forbidden"]
    first = problems[0]
    path, node = _walk(schema, unknown[0][:-1] if unknown else first["loc"])
    error = first.get("ctx", {}).get("error")
    if unknown:
        names = sorted(str(loc[-1]) for loc in unknown if loc[:-1] == path)
        known = sorted(
            name for option in _options(schema, node) for name in option.get("properties", {})
        )
        where = f" in {'.'.join(path)}" if path else ""
        text = f"unknown field(s) {names}{where}; known: {', '.join(known)}"
    elif first["type"] == "value_error" and str(error):
        text = str(error)
    elif path:
        value: Any = values
        for name in path:  # the value as given, not as pydantic converted it
            value = value.get(name, first["input"]) if isinstance(value, Mapping) else value
        text = f"{' '.join(path)} must be {node.get('description', 'valid')}, got {value!r}"
    else:
        text = f"invalid metadata: {first['msg']}"
    more = len({p["loc"][:1] for p in problems}) - 1  # a field's problems (union branches) once
    return text + (f" (and {more} more field{'s' * (more > 1)} to fix)" if more else "")


@cache
def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def _options(schema: dict[str, Any], node: dict[str, Any]) -> list[dict[str, Any]]:
    """``node`` and its ``anyOf`` branches, references resolved."""
    options = [node, *node.get("anyOf", [])]
    return [schema["$defs"][o["$ref"].rsplit("/", 1)[-1]] if "$ref" in o else o for o in options]


def _walk(schema: dict[str, Any], loc: tuple[Any, ...]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The longest start of ``loc`` that names schema properties (not list items), and its node."""
    path: tuple[str, ...] = ()
    node = schema
    for name in loc:
        children = [
            o["properties"][name] for o in _options(schema, node) if name in o.get("properties", {})
        ]
        if not isinstance(name, str) or not children:
            break
        path, node = (*path, name), children[0]
    return path, node
