"""Every config key with its one-line meaning and default, read from the dataclasses' field
docstrings: what ``--help`` of the training and inference entry points lists."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing

from toollmm.config import RunConfig


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for a dataclass whose fields are each followed by a string literal."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _nested_dataclass(cls: type, name: str) -> type | None:
    hint = typing.get_type_hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def config_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, object]]:
    """``(dotted key, docstring, default)`` for every leaf field, in declaration order."""
    instance = cls()
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        nested = _nested_dataclass(cls, f.name)
        if nested is not None:
            rows += config_keys(nested, f"{key}.")
        else:
            rows.append((key, field_docs(cls).get(f.name, ""), getattr(instance, f.name)))
    return rows


def keys_help(sections: tuple[str, ...] = ("model", "data", "train", "inference")) -> str:
    """The ``key=value`` overrides a command accepts, one line each (``--help``'s epilog)."""
    lines = ["config keys (key=value overrides; YAML layers set the same keys):"]
    for key, doc, default in config_keys():
        if key.split(".")[0] in sections:
            lines.append(f"  {key} = {default!r}: {doc}" if doc else f"  {key} = {default!r}")
    return "\n".join(lines)
