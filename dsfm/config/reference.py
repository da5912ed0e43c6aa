"""`dsfm config`: the reference of every setting, generated from the schema's field docs; a
config resolved from defaults < YAML < overrides (whole, as a diff, or one value, which the
Slurm scripts read, e.g. train.out_dir); the bundled configs and DeepSpeed recipes.

The one-line docstring after each dataclass field is read with `ast` from the source, so
the reference cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import typing
from typing import Any

import yaml

from dsfm.config.load import RECIPES, bundled, find_recipe, load_config, to_dict
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


def config_command(
    config: str | None,
    get: str | None,
    diff: bool,
    show_reference: bool,
    list_bundled: bool,
    overrides: list[str],
) -> int:
    """The reference when given nothing (or --reference); else the config resolved from
    defaults < --config < overrides: all of it as YAML, only what differs from the defaults
    (--diff), or one value (--get, what the Slurm scripts read)."""
    if list_bundled:
        print(listing())
        return 0
    if show_reference or not (config or overrides or get or diff):
        print(reference())
        return 0
    cfg = to_dict(load_config(find_recipe(config, "configs") if config else None, overrides))
    if get is not None:
        section, _, key = get.partition(".")
        if section not in cfg or key not in cfg[section]:
            raise ValueError(f"--get {get}: no such setting (see `dsfm config --reference`)")
        print(cfg[section][key])
        return 0
    # one length, as a config says it: epochs (resolved to steps from the data) or max_steps
    del cfg["train"]["max_steps" if cfg["train"]["epochs"] is not None else "epochs"]
    if diff:
        cfg = differences(cfg, to_dict(load_config()))
    print(yaml.safe_dump(cfg, sort_keys=False).rstrip() if cfg else "# same as the defaults")
    return 0


def differences(cfg: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The settings of `cfg` whose values differ from `defaults`, section by section."""
    out: dict[str, Any] = {}
    for section, values in cfg.items():
        changed = {k: v for k, v in values.items() if defaults[section].get(k) != v}
        if changed:
            out[section] = changed
    return out


def listing() -> str:
    """The bundled training configs and DeepSpeed recipes: names usable with --config and
    --ds from any directory, and where they live."""
    lines = []
    for kind, flag in (("configs", "--config"), ("ds_configs", "--ds")):
        lines.append(f"{flag} (bundled in {RECIPES / kind}):")
        lines += [f"  {name}" for name in bundled(kind)]
    return "\n".join(lines)
