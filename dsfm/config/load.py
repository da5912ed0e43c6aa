"""Loading a training config: defaults < YAML file < `section.field=value` overrides.

Every problem is collected and raised together as one `ConfigError`: YAML syntax, unknown
sections and keys (with a "did you mean"), wrong types and, once the config is built, the
pure rules of `checks.check`. Nothing here looks at files other than the YAML itself; the
datasets and checkpoints a config names are the business of `resolve.py`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dsfm.config.checks import check
from dsfm.config.schema import SECTIONS, Config, ConfigError, suggest
from dsfm.model.config import PRESETS

# The bundled training configs (configs/*.yaml) and DeepSpeed recipes (ds_configs/*.json):
# package data, so an installed dsfm has them; the checkout's top-level configs/ and
# ds_configs/ are links to these directories.
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
KINDS = {"configs": ".yaml", "ds_configs": ".json"}


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, world_size: int = 1
) -> Config:
    """Defaults < YAML file < `key.sub=value` overrides, checked by `checks.check`.

    Raises one ConfigError listing every problem: syntax, unknown keys, wrong types and
    impossible combinations together.
    """
    cfg, problems = parse_config(path, overrides)
    problems += check(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    return cfg


def parse_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[Config, list[str]]:
    """The config as far as it can be built, and the problems met building it (unknown
    keys, wrong types: those fields keep their defaults). A missing or unreadable file
    raises ConfigError at once: nothing else can be said without it."""
    raw: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        raw = _read_yaml(Path(path))
        problems += _length_problems(raw, str(path))
    layer: dict[str, Any] = {}
    for item in overrides or []:
        try:
            _apply_override(layer, item)
        except ValueError as e:
            problems.append(str(e))
    problems += _length_problems(layer, "the overrides")
    train = layer.get("train")
    if isinstance(train, dict) and isinstance(raw.get("train"), dict):
        # a run's length given on the command line replaces the file's, whichever kind
        if LENGTH_KEYS & train.keys():
            raw["train"] = {k: v for k, v in raw["train"].items() if k not in LENGTH_KEYS}
    for name, section in layer.items():
        if isinstance(section, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **section}
        else:
            raw[name] = section
    return _build(raw, problems), problems


LENGTH_KEYS = {"max_steps", "epochs"}  # one of them says how long a run is


def _length_problems(raw: dict[str, Any], where: str) -> list[str]:
    """Both lengths in one layer: a problem, and `epochs` dropped (no follow-on problems)."""
    train = raw.get("train")
    if isinstance(train, dict) and LENGTH_KEYS <= train.keys():
        del train["epochs"]
        return [
            f"train.max_steps and train.epochs are both set in {where}; set one (epochs "
            "resolve to steps from the dataset size and the global batch)"
        ]
    return []


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a resolved config (e.g. from a checkpoint's client state), checked."""
    problems: list[str] = []
    cfg = _build(d, problems)
    problems += check(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["optim"]["betas"] = list(cfg.optim.betas)
    return d


def find_recipe(path: str, kind: str) -> str:
    """A config (`kind` "configs") or DeepSpeed recipe ("ds_configs") path as given, else
    bundled: `zero2`, `ds_configs/zero2.json` and `zero2.json` all name the bundled recipe,
    so the checkout's paths work from any directory and with an installed package."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return str(p)
    name = p.name if p.suffix else p.name + KINDS[kind]
    if p.parent in (Path("."), Path(kind)) and (RECIPES / kind / name).is_file():
        return str(RECIPES / kind / name)
    return str(p)


def bundled(kind: str) -> list[str]:
    """The bundled names of `kind` ("configs" or "ds_configs"): `smoke`, `zero2`, ..."""
    return sorted(p.stem for p in (RECIPES / kind).glob("*" + KINDS[kind]))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            [
                f"config file {path} not found: pass the path to your YAML or a bundled "
                f"config ({', '.join(bundled('configs'))}; `dsfm config --list`)"
            ]
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            [
                f"{path} must hold a mapping of sections (model:, train:, ...), "
                f"got {type(raw).__name__}"
            ]
        )
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key.sub=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"override key {key!r} must be section.field, e.g. train.max_steps=100")
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ValueError(f"override {item!r}: section {parts[0]!r} is not a mapping")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # a plain string with YAML-special characters
    section[parts[1]] = value


def _build(raw: dict[str, Any], problems: list[str]) -> Config:
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            problems.append(f"unknown section {name!r}{suggest(name, list(SECTIONS))}")
            continue
        if not isinstance(value, dict):
            problems.append(f"section {name!r} must be a mapping, got {value!r}")
            continue
        if name == "model":
            value = _with_preset(value, problems)
        sections[name] = _build_section(name, SECTIONS[name], value, problems)
    cfg = Config(**sections)
    cfg.model = cfg.model.filled()  # the saved config names every size
    return cfg


def _with_preset(value: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    preset = value.get("preset")
    if preset is None:
        return value
    if preset not in PRESETS:
        problems.append(
            f"model.preset: unknown preset {preset!r}{suggest(str(preset), list(PRESETS))}"
        )
        return value
    return {**PRESETS[preset], **value}  # explicit fields beat the preset


def _build_section(section: str, cls: type, value: dict[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, item in value.items():
        if key not in hints:
            problems.append(f"unknown key {section}.{key}{suggest(key, list(hints))}")
            continue
        try:
            kwargs[key] = _coerce(item, hints[key])
        except TypeError as e:
            problems.append(f"{section}.{key}: {e}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any) -> Any:
    """A YAML/CLI value converted to the annotated type, or TypeError saying what was expected."""
    if dataclasses.is_dataclass(tp):  # a list item such as data.mix's {path:, weight:}
        hints = typing.get_type_hints(tp)
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping with keys {', '.join(hints)}, got {value!r}")
        for key in value:
            if key not in hints:
                raise TypeError(f"unknown key {key!r}{suggest(str(key), list(hints))}")
        return tp(**{k: _coerce(v, hints[k]) for k, v in value.items()})
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0])
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise TypeError(f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return [_coerce(v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                if float(value).is_integer():
                    return int(float(value))
            except ValueError:
                pass
        _fail(value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(value, "a string")
    raise TypeError(f"unsupported type {tp}")


def _fail(value: Any, expected: str) -> Any:
    raise TypeError(f"expected {expected}, got {value!r}")
