"""Every config key with its one-line meaning and default, read from the dataclasses' field
docstrings: what ``--help`` of the training and inference entry points lists."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap

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


def config_keys(config: object | None = None, prefix: str = "") -> list[tuple[str, str, object]]:
    """``(dotted key, docstring, default)`` for every leaf field of ``config`` (default: a default
    ``RunConfig``), in declaration order. Defaults come from the instance, so each
    ``model.outputs.<modality>`` section shows its own published values."""
    config = RunConfig() if config is None else config
    docs = field_docs(type(config))
    rows = []
    for f in dataclasses.fields(config):
        key, value = f"{prefix}{f.name}", getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            rows += config_keys(value, f"{key}.")
        else:
            rows.append((key, docs.get(f.name, ""), value))
    return rows


def keys_help(prefixes: tuple[str, ...] = ("",)) -> str:
    """The ``key=value`` overrides a command accepts, one line each (``--help``'s epilog): the keys
    starting with one of ``prefixes`` (default: all)."""
    lines = ["config keys as key=default, before any YAML layer or checkpoint config (override with key=value;\n"
             " the details are in docs/configuration.md):"]
    for key, doc, default in config_keys():
        if key.startswith(prefixes):
            lines.append(f"  {key}={json.dumps(default, ensure_ascii=False)}  {doc}")  # JSON: valid YAML
    return "\n".join(lines)
