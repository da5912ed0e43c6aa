"""Config: YAML + overrides into typed sections, resolved against the data; every problem
reported at once, before any work."""

from __future__ import annotations

import json

import pytest

from dsfm.config.deepspeed import fill_ds_config, read_ds_config
from dsfm.config.load import from_dict, to_dict
from dsfm.config.reference import reference
from dsfm.config.resolve import load_resolved
from dsfm.config.schema import ConfigError


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"vocab_size": 300}))
    return d


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def problems(path=None, overrides=(), world_size=1):
    with pytest.raises(ConfigError) as e:
        load_resolved(path, list(overrides), world_size=world_size)
    return str(e.value)


def test_yaml_overrides_and_types(tmp_path, data_dir):
    path = write(
        tmp_path,
        f"model: {{preset: d4}}\ndata: {{path: {data_dir}}}\n"
        "optim: {lr: 3e-4}\ntrain: {max_steps: 500}\n",
    )
    cfg = load_resolved(
        path,
        [
            "train.max_steps=1e3",
            "optim.betas=[0.9, 0.99]",
            "model.tie_embeddings=true",
            "eval.prompts=[a, b]",
        ],
    )
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == 3e-4  # PyYAML reads "3e-4" as a string; we convert it
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.model.tie_embeddings is True and cfg.eval.prompts == ["a", "b"]
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_kv_heads) == (256, 4, 4)
    assert cfg.model.vocab_size == 300  # taken from the data
    assert from_dict(to_dict(cfg)) == cfg


def test_preset_fields_can_be_overridden_consistently(data_dir):
    cfg = load_resolved(None, ["model.preset=d8", "model.n_heads=4", f"data.path={data_dir}"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_kv_heads) == (512, 4, 4)


@pytest.mark.parametrize(
    "chat, override, expected",
    [
        (True, None, True),  # chat data: on by default
        (False, None, False),  # pretraining: off by default (no GPU measurement yet)
        (True, False, False),  # an explicit choice is kept either way
        (False, True, True),
    ],
)
def test_doc_mask_resolved_from_the_data_kind(data_dir, chat, override, expected):
    if chat:
        meta = json.loads((data_dir / "meta.json").read_text())
        (data_dir / "meta.json").write_text(json.dumps({**meta, "loss_mask": True}))
    overrides = [f"data.path={data_dir}"]
    if override is not None:
        overrides.append(f"model.doc_mask={str(override).lower()}")
    assert load_resolved(None, overrides).model.doc_mask is expected


def test_unknown_keys_suggest_and_all_problems_reported_together(tmp_path, data_dir):
    path = write(
        tmp_path,
        f"data: {{path: {data_dir}}}\ntrian: {{max_steps: 1}}\n"
        "train: {max_step: 10, seed: abc}\nmodel: {d_model: 100, n_heads: 3}\n",
    )
    msg = problems(path)
    assert "unknown section 'trian' (did you mean 'train'?)" in msg
    assert "unknown key train.max_step (did you mean 'max_steps'?)" in msg
    assert "train.seed: expected an integer, got 'abc'" in msg
    assert "model.n_heads=3 does not divide model.d_model=100" in msg
    assert "4 problem(s)" in msg


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["model.n_heads=8", "model.n_kv_heads=3"],
            "model.n_kv_heads=3 does not divide model.n_heads=8",
        ),
        (
            ["model.d_model=96", "model.n_heads=5"],
            "model.n_heads=5 does not divide model.d_model=96",
        ),
        (["model.d_model=96", "model.n_heads=32"], "head size d_model/n_heads = 3 is odd"),
        (
            ["train.seq_len=4096", "model.max_seq_len=2048"],
            "train.seq_len=4096 exceeds model.max_seq_len=2048",
        ),
        (
            ["train.global_batch_size=64", "train.micro_batch_size=8", "train.grad_accum=2"],
            "train.global_batch_size=64 but micro_batch_size (8) x grad_accum (2) x world size (2)"
            " = 32",
        ),
        (
            ["model.vocab_size=256"],
            "model.vocab_size=256 is smaller than the dataset's vocabulary (300)",
        ),
        (
            ["schedule.warmup_steps=50", "train.max_steps=50"],
            "schedule.warmup_steps=50 must be below",
        ),
        (["train.precision=fp8"], "train.precision must be one of bf16, fp16, fp32"),
        (["train.micro_batch_size=0"], "train.micro_batch_size must be >= 1, got 0"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["train.max_steps=ten"], "train.max_steps: expected an integer, got 'ten'"),
        (["train.stop_at=5000", "train.max_steps=100"], "train.stop_at=5000 must be in [1"),
        (["trainmax_steps=5"], "must be section.field"),
        (["model.preset=d7"], "unknown preset 'd7'"),
    ],
)
def test_bad_configs_give_clear_messages(data_dir, overrides, expected):
    assert expected in problems(None, [f"data.path={data_dir}", *overrides], world_size=2)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=nan", "optim.lr=nan"),
        ("optim.lr=-inf", "optim.lr=-inf"),
        ("optim.betas=[0.9,inf]", "optim.betas[1]=inf"),
        ("train.watchdog_s=.inf", "train.watchdog_s=inf"),
        ("model.rope_theta=NaN", "model.rope_theta=nan"),
    ],
)
def test_non_finite_numbers_are_refused_once_by_key(data_dir, override, key):
    """A NaN passes every `<`/`>` rule, so it is refused by its key, and only once."""
    text = problems(None, [f"data.path={data_dir}", override])
    assert f"{key} is not a finite number" in text
    assert "(1 problem(s))" in text, text


def test_missing_data_and_files(tmp_path):
    assert "data.path is not set" in problems()
    assert "no meta.json there" in problems(None, [f"data.path={tmp_path}"])
    assert "config file" in problems(tmp_path / "nope.yaml")
    bad = write(tmp_path, "model: [1, 2\n")
    assert "not valid YAML" in problems(bad)


def test_ds_auto_filled_from_training_config(data_dir):
    cfg = load_resolved(
        None,
        [
            f"data.path={data_dir}",
            "train.micro_batch_size=4",
            "train.grad_accum=3",
            "optim.lr=1e-3",
            "train.max_steps=200",
            "schedule.warmup_steps=10",
            "train.precision=fp32",
        ],
    )
    ds = fill_ds_config(read_ds_config("ds_configs/zero2.json"), cfg, world_size=2)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    assert "scheduler" not in ds  # the trainer sets each update's LR (train/schedule.py)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2


def test_ds_config_disagreeing_with_training_config_is_refused(data_dir):
    cfg = load_resolved(None, [f"data.path={data_dir}", "optim.lr=1e-3"])
    ds = read_ds_config("ds_configs/zero1.json")
    ds["optimizer"]["params"]["lr"] = 5e-4
    ds["gradient_clipping"] = 2.0
    with pytest.raises(ConfigError) as e:
        fill_ds_config(ds, cfg, world_size=1)
    assert "optimizer.params.lr=0.0005" in str(e.value) and "gradient_clipping=2.0" in str(e.value)


def test_ds_config_with_its_own_scheduler_is_refused(data_dir):
    cfg = load_resolved(None, [f"data.path={data_dir}"])
    ds = read_ds_config("ds_configs/zero1.json")
    ds["scheduler"] = {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto"}}
    with pytest.raises(ConfigError, match='remove "scheduler" from the JSON'):
        fill_ds_config(ds, cfg, world_size=1)


def test_epochs_resolve_to_steps_from_the_data_and_global_batch(byte_data, tmp_path):
    from dsfm.data.dataset import TokenDataset

    samples = len(TokenDataset(byte_data, "train", 32))
    base = [f"data.path={byte_data}", "train.seq_len=32", "train.micro_batch_size=4"]
    cfg = load_resolved(None, [*base, "train.epochs=3", "train.grad_accum=2"], world_size=2)
    assert cfg.train.max_steps == -(-3 * samples // 16) and cfg.train.epochs == 3
    # one layer setting both is an error; the command line's length replaces the file's
    assert "both set in the overrides" in problems(
        None, [*base, "train.epochs=1", "train.max_steps=5"]
    )
    path = write(tmp_path, "train: {max_steps: 250, epochs: 2}\n")
    assert f"both set in {path}" in problems(path, base)
    path = write(tmp_path, "train: {max_steps: 250}\n")
    assert load_resolved(path, [*base, "train.epochs=1"]).train.max_steps == -(-samples // 4)
    # the steps rules are checked once epochs are resolved
    assert "schedule.warmup_steps=100000 must be below train.max_steps" in problems(
        None, [*base, "train.epochs=1", "schedule.warmup_steps=100000"]
    )
    assert "train.epochs must be >= 1" in problems(None, [*base, "train.epochs=0"])


def test_resume_from_errors(data_dir, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "best").mkdir(parents=True)
    base = [f"data.path={data_dir}", f"train.out_dir={run}"]
    text = problems(None, [*base, "train.resume_from=step_7"])
    assert "no complete tag step_00000007" in text and "its tags: best" in text
    assert "does not exist" in problems(None, [*base, f"train.resume_from={tmp_path}/nope"])
    text = problems(None, [*base, "train.resume_from=best", f"train.init_from={run}"])
    assert "init_from" in text and "pick one" in text


def test_every_field_documented():
    ref = reference()
    assert "| `train.max_steps` | `1000` | Optimizer steps to train for (or set" in ref
    assert all(
        line.rstrip().endswith("|") and not line.endswith("|  |")
        for line in ref.splitlines()
        if line.startswith("| `")
    )
