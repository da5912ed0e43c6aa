"""The W&B and TensorBoard sinks as their users expect them: W&B settings from the config, else
WANDB_* variables, else dsfm's defaults; one W&B run id per run directory (real offline
runs, read back from their files); TensorBoard's config text and hparams read back by
TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from dsfm.config.schema import LogConfig
from dsfm.observe.sinks import WandbSink, open_sinks, wandb_settings

ROW = {"step": 1, "tokens": 64, "loss": 5.5, "lr": 1e-3, "grad_norm": 1.0, "tok_per_s": 900.0}
WANDB_VARS = ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_MODE")


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """wandb's own files in the test's directory, and no WANDB_* settings from outside."""
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


def offline_run_ids(run_dir: Path) -> list[str]:
    """The id of each offline W&B run under RUN/wandb/, oldest first, from its run-<id>.wandb."""
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    return [next(d.glob("run-*.wandb")).stem.removeprefix("run-") for d in dirs]


def test_wandb_settings_config_then_env_then_defaults(tmp_path):
    run_dir = tmp_path / "lr3e-3"
    defaults = wandb_settings(LogConfig(), run_dir, environ={})
    assert defaults["project"] == "dsfm" and defaults["mode"] == "offline"
    assert defaults["name"] == "lr3e-3" and defaults["dir"] == str(run_dir)
    assert defaults["entity"] is defaults["group"] is defaults["tags"] is None

    env = {"WANDB_PROJECT": "p-env", "WANDB_ENTITY": "e-env", "WANDB_RUN_GROUP": "g-env",
           "WANDB_TAGS": "a, b,", "WANDB_MODE": "disabled"}  # fmt: skip
    from_env = wandb_settings(LogConfig(), run_dir, environ=env)
    assert (from_env["project"], from_env["entity"], from_env["group"]) == (
        "p-env",
        "e-env",
        "g-env",
    )
    assert from_env["tags"] == ["a", "b"] and from_env["mode"] == "disabled"

    cfg = LogConfig(wandb_project="p", wandb_entity="e", wandb_group="g", wandb_tags=["t"],
                    wandb_mode="online")  # fmt: skip
    explicit = wandb_settings(cfg, run_dir, environ=env)
    assert [explicit[k] for k in ("project", "entity", "group", "tags", "mode")] == [
        "p",
        "e",
        "g",
        ["t"],
        "online",
    ]
    # an explicit empty tag list is the config's choice too: no tags, whatever WANDB_TAGS says
    assert wandb_settings(LogConfig(wandb_tags=[]), run_dir, environ=env)["tags"] is None


def test_wandb_disabled_by_env_writes_nothing_unless_the_config_says_offline(
    tmp_path, monkeypatch, wandb_home
):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert open_sinks(LogConfig(sinks=["wandb"]), run_dir, Console(), 2, 0, 1) == []
    assert list(run_dir.iterdir()) == []

    [sink] = open_sinks(
        LogConfig(sinks=["wandb"], wandb_mode="offline"), run_dir, Console(), 2, 0, 1
    )
    sink.log(ROW)
    sink.close()
    assert len(offline_run_ids(run_dir)) == 1


def test_wandb_run_id_is_kept_across_invocations(tmp_path, monkeypatch, wandb_home):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def invocation(start_step: int) -> str:
        sink = WandbSink(run_dir, wandb_settings(LogConfig(), run_dir), {"a": 1}, start_step)
        assert (sink.run.project, sink.run.name) == ("from-env", "run")
        sink.log({**ROW, "step": start_step + 1})
        sink.close()
        return sink.run.id

    first = invocation(0)
    assert invocation(5) == first  # a resume continues the same W&B run
    assert offline_run_ids(run_dir) == [first, first]
    fresh = invocation(0)  # a run that starts over gets a new one: W&B drops steps going back
    assert fresh != first and (run_dir / "wandb_run_id").read_text().strip() == fresh


def test_tensorboard_gets_config_text_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from dsfm.observe.sinks import TensorBoardSink

    config = {"optim": {"lr": 0.003}, "train": {"max_steps": 2, "compile": False},
              "data": {"mix": [], "path": None}, "eval": {"prompts": ["def ", "The "]}}  # fmt: skip
    sink = TensorBoardSink(tmp_path, config, start_step=0)
    sink.log(ROW)
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    [text] = acc.Tensors("config/text_summary")
    yaml_text = text.tensor_proto.string_val[0].decode()
    assert "max_steps: 2" in yaml_text and "lr: 0.003" in yaml_text

    content = acc.PluginTagToContent("hparams")
    info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = info.session_start_info.hparams
    assert values["optim.lr"].number_value == 0.003
    assert values["train.max_steps"].number_value == 2
    assert values["train.compile"].bool_value is False
    assert values["eval.prompts"].string_value == '["def ", "The "]'
    assert values["data.path"].string_value == "null"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    names = [m.name.tag for m in experiment.experiment.metric_infos]
    assert names == ["train/loss", "val/loss"]


def test_status_line_shows_gpu_memory_only_when_logged():
    from dsfm.observe.sinks import status_line

    assert "mem" not in status_line(ROW, 10)
    assert " | mem 10.5 GiB | " in status_line({**ROW, "mem_gb": 10.54}, 10)
