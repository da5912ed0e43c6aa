"""`dsfm config`: the reference of every setting, generated from the schema's field docs, or
one resolved value (what the Slurm scripts read, e.g. train.out_dir).

The one-line docstring after each dataclass field is read with `ast` from the source, so
the reference cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import typing

from dsfm.config.load import find_recipe, load_config, to_dict
from dsfm.config.schema import SECTIONS


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring written after each dataclass field."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value  # type: ignore[union-attr]
    return docs


def reference() -> str:
    """Markdown reference of every setting, generated from the field docstrings."""
    lines = ["# Training config reference", ""]
    for name, cls in SECTIONS.items():
        lines += [f"## {name}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            lines.append(
                f"| `{name}.{f.name}` | `{json.dumps(default)}` | {docs.get(f.name, '')} |"
            )
            item = typing.get_args(typing.get_type_hints(cls)[f.name])
            if item and dataclasses.is_dataclass(item[0]):  # list entries: data.mix[].path
                item_docs = field_docs(item[0])
                for sub in dataclasses.fields(item[0]):
                    lines.append(
                        f"| `{name}.{f.name}[].{sub.name}` | `{json.dumps(sub.default)}` | "
                        f"{item_docs.get(sub.name, '')} |"
                    )
        lines.append("")
    return "\n".join(lines)


def config_command(config: str | None, get: str | None, overrides: list[str]) -> int:
    if get is None:
        print(reference())
        return 0
    cfg = to_dict(load_config(find_recipe(config) if config else None, overrides))
    section, _, key = get.partition(".")
    if section not in cfg or key not in cfg[section]:
        raise ValueError(f"--get {get}: no such setting (see `dsfm config`)")
    print(cfg[section][key])
    return 0
