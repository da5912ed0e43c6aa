"""`build.data_overrides`: what `--data` (or no data at all) makes of `data.path`."""

from __future__ import annotations

import pytest

from dsfm.config.schema import ConfigError
from dsfm.data.format import read_meta
from dsfm.train.build import data_overrides


def test_a_prepared_dataset_is_used_as_is(byte_data, tmp_path):
    assert data_overrides(None, [f"train.out_dir={tmp_path}"], str(byte_data)) == [
        f"data.path={byte_data}"
    ]
    assert not (tmp_path / "data").exists()
    assert data_overrides(None, [f"data.path={byte_data}"], None) == []


def test_raw_text_is_prepared_into_the_run_with_the_model_vocabulary(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    corpus = tmp_path / "input.txt"
    corpus.write_text("First Citizen: Before we proceed any further, hear me speak.\n" * 200)
    run = tmp_path / "run"
    (override,) = data_overrides(
        None, [f"train.out_dir={run}", "model.vocab_size=300"], str(corpus)
    )
    path = override.removeprefix("data.path=")
    assert path.startswith(str(run / "data" / "input-"))
    assert 257 < read_meta(path)["vocab_size"] <= 300


def test_data_replaces_the_yamls_data(byte_data, tmp_path):
    """`--data` beats the YAML's data.path and data.mix, as the command line always does."""
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"data:\n  mix:\n    - {{path: {tmp_path / 'elsewhere'}, weight: 1}}\n")
    assert data_overrides(str(yaml), [], str(byte_data)) == [
        "data.mix=[]",
        f"data.path={byte_data}",
    ]
    yaml.write_text(f"data:\n  path: {tmp_path / 'elsewhere'}\n")
    assert data_overrides(str(yaml), [], str(byte_data)) == [f"data.path={byte_data}"]


def test_data_named_twice_or_a_bad_config_stop_first(byte_data, tmp_path):
    with pytest.raises(ValueError, match="--data .* and data.path= on the command line both"):
        data_overrides(None, [f"data.path={byte_data}"], str(tmp_path / "x.txt"))
    with pytest.raises(ConfigError) as e:  # no embedded corpus prepared for a broken config
        data_overrides(None, ["train.max_stepz=3"], None)
    assert "data.path is not set" not in str(e.value)
