"""The command line's own surface: version, a description per verb, defaults in the help."""

from __future__ import annotations

import argparse

import pytest

from dsfm import __version__
from dsfm.cli import build_parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found |= {f"{name} {k}": v for k, v in subparsers(sub).items()}
    return found


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dsfm {__version__}"


def test_every_verb_describes_itself_and_shows_its_defaults():
    for name, sub in subparsers(build_parser()).items():
        assert sub.description, name
        text = sub.format_help()
        for action in sub._actions:
            shown = action.default not in (None, False, argparse.SUPPRESS) and action.help
            if shown:
                said = f"(default: {action.default})" in " ".join(text.split())
                assert said or "default" in action.help, (name, action.dest)


@pytest.mark.parametrize(
    "verb, expected",
    [
        ("prepare", "(default: 8192)"),
        ("generate", "(default: 200)"),
        ("finetune", "(default: sft_lora)"),
        ("train", "(default: zero0)"),
    ],
)
def test_defaults_named_in_help(verb, expected):
    text = " ".join(subparsers(build_parser())[verb].format_help().split())
    assert expected in text
    if verb == "finetune":
        assert "smoke" not in text  # no example that is not its default


def test_top_level_help_is_for_users():
    text = build_parser().format_help()
    assert "VERBS" not in text and "`dsfm <verb>`" not in text
    assert "dsfm train --config smoke" in text
