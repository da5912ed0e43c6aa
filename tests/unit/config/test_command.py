"""`dsfm config`: a config resolved as YAML, its differences from the defaults, one value, the
reference, the bundled configs and recipes; and how `--config`/`--ds` names are found."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from dsfm.config.load import RECIPES, find_recipe, load_config, to_dict
from dsfm.config.reference import config_command
from dsfm.config.schema import ConfigError


def show(capsys, config=None, overrides=(), **flags) -> str:
    args = dict(get=None, diff=False, show_reference=False, list_bundled=False) | flags
    assert config_command(config, overrides=list(overrides), **args) == 0
    return capsys.readouterr().out


def test_resolved_config_is_the_yaml_that_loads_back(capsys, tmp_path):
    out = show(capsys, "smoke", ["train.max_steps=70", "optim.lr=1e-3"])
    printed = yaml.safe_load(out)
    assert printed["train"]["max_steps"] == 70 and printed["optim"]["lr"] == 1e-3
    assert printed["model"]["d_model"] == 96 and printed["train"]["out_dir"] == "runs/smoke"
    # what it prints is a config: saved and loaded again, the same settings
    (tmp_path / "c.yaml").write_text(out)
    assert to_dict(load_config(tmp_path / "c.yaml")) == printed | {
        "train": {**printed["train"], "epochs": None}
    }
    by_epochs = yaml.safe_load(show(capsys, "smoke", ["train.epochs=2"]))
    assert by_epochs["train"]["epochs"] == 2 and "max_steps" not in by_epochs["train"]


def test_diff_prints_only_what_differs_from_the_defaults(capsys):
    diff = yaml.safe_load(show(capsys, None, ["train.max_steps=700", "optim.lr=1e-3"], diff=True))
    assert diff == {"optim": {"lr": 1e-3}, "train": {"max_steps": 700}}
    assert "same as the defaults" in show(capsys, None, ["train.max_steps=1000"], diff=True)
    smoke = yaml.safe_load(show(capsys, "configs/smoke.yaml", diff=True))
    assert smoke["train"]["out_dir"] == "runs/smoke" and "betas" not in smoke["optim"]


def test_reference_get_and_list(capsys):
    assert show(capsys).startswith("# Training config reference")  # given nothing
    assert show(capsys, "smoke", show_reference=True).startswith("# Training config reference")
    assert show(capsys, "smoke", get="train.out_dir").strip() == "runs/smoke"
    listing = show(capsys, list_bundled=True)
    for name in ("smoke", "d12", "sft_lora", "zero0", "zero2", "zero3_offload"):
        assert f"  {name}\n" in listing + "\n"
    with pytest.raises(ValueError, match="no such setting"):
        show(capsys, "smoke", get="train.nope")


def test_bundled_names_paths_and_your_own_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty directory: no checkout around
    zero2 = str(RECIPES / "ds_configs" / "zero2.json")
    for name in ("zero2", "zero2.json", "ds_configs/zero2.json"):
        assert find_recipe(name, "ds_configs") == zero2
    assert find_recipe("configs/smoke.yaml", "configs") == str(RECIPES / "configs/smoke.yaml")
    assert find_recipe("zero2", "configs") == "zero2"  # not a training config: left as given
    Path("configs").mkdir()
    Path("configs/smoke.yaml").write_text("train: {max_steps: 5}\n")  # yours wins
    assert find_recipe("configs/smoke.yaml", "configs") == "configs/smoke.yaml"
    with pytest.raises(ConfigError, match=r"bundled config \(d12, d20, d8, sft_lora, smoke"):
        load_config(find_recipe("smok", "configs"))


def test_checkout_paths_are_links_to_the_bundled_recipes():
    root = Path(__file__).resolve().parents[3]
    for kind in ("configs", "ds_configs"):
        assert os.path.realpath(root / kind) == str(RECIPES / kind)
