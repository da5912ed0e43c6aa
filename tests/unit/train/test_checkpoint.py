"""Checkpoint bookkeeping that needs no engine: pruning, locating tags, client state, groups."""

from __future__ import annotations

import json

import pytest

from dsfm.model.config import ModelConfig
from dsfm.model.gpt import GPT
from dsfm.train import checkpoint
from dsfm.train.engine import param_groups


def make_tag(ckpt_dir, tag, state=None):
    (ckpt_dir / tag).mkdir(parents=True)
    (ckpt_dir / tag / checkpoint.STATE_FILE).write_text(json.dumps(state or {"step": 0}))
    checkpoint.write_manifest(ckpt_dir / tag)


def test_prune_keeps_last_k_and_protected_tags(tmp_path):
    for step in (100, 200, 300, 400):
        make_tag(tmp_path, checkpoint.step_tag(step))
    make_tag(tmp_path, "best")
    make_tag(tmp_path, "final")
    (tmp_path / "latest").write_text(checkpoint.step_tag(100))  # e.g. a rolled-back latest
    deleted = checkpoint.prune(tmp_path, keep_last=2)
    assert deleted == [checkpoint.step_tag(200)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "best",
        "final",
        "step_00000100",
        "step_00000300",
        "step_00000400",
    ]


def test_resolve_run_dir_checkpoints_dir_and_tag(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    make_tag(ckpts, "step_00000010")
    (ckpts / "latest").write_text("step_00000010")
    for path in (tmp_path / "run", ckpts, ckpts / "step_00000010"):
        assert checkpoint.resolve(path) == (ckpts, "step_00000010")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.resolve(tmp_path / "nope")
    (ckpts / "latest").write_text("step_00000099")  # points at a tag that never completed
    assert checkpoint.resolve(tmp_path / "run") == (ckpts, "step_00000010")  # falls back
    (ckpts / "step_00000010" / checkpoint.STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.resolve(tmp_path / "run")


def test_client_state_errors_are_clear(tmp_path):
    (tmp_path / "t").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete dsfm checkpoint"):
        checkpoint.client_state(tmp_path, "t")
    (tmp_path / "t" / checkpoint.STATE_FILE).write_text("{truncated")
    with pytest.raises(ValueError, match="is corrupt"):
        checkpoint.client_state(tmp_path, "t")


def test_weight_decay_only_on_matrices():
    model = GPT(ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2, max_seq_len=16))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[0].split(".")[-1] for p in no_decay["params"]} == {
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
    }
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def publish_tag(ckpt_dir, tag, step=0, latest=True):
    """What Checkpointer.save does on rank 0 once every rank has written its files."""
    partial = checkpoint.PARTIAL + tag
    make_tag(ckpt_dir, partial, {"step": step})
    (ckpt_dir / partial / "shard.pt").write_bytes(b"x" * 100)
    checkpoint.write_manifest(ckpt_dir / partial)
    checkpoint.publish(ckpt_dir, partial, tag)
    if latest:
        checkpoint.write_latest(ckpt_dir, tag)


def test_truncated_or_unpublished_newest_tag_falls_back_with_a_warning(tmp_path, capsys):
    publish_tag(tmp_path, checkpoint.step_tag(2), 2)
    publish_tag(tmp_path, checkpoint.step_tag(4), 4)
    assert checkpoint.resumable_tag(tmp_path) == "step_00000004"
    shard = tmp_path / "step_00000004" / "shard.pt"
    shard.write_bytes(b"x" * 10)  # truncated, as by a full disk or a kill during a copy
    assert checkpoint.resumable_tag(tmp_path) == "step_00000002"
    assert "skipping checkpoint" in capsys.readouterr().err
    assert checkpoint.resolve(tmp_path) == (tmp_path, "step_00000002")  # generate/eval/export
    shard.unlink()
    assert "shard.pt is missing" in checkpoint.incomplete_reason(tmp_path, "step_00000004")
    # `latest` lost (killed between publish and latest): the newest complete tag still counts
    (tmp_path / "latest").unlink()
    publish_tag(tmp_path, checkpoint.step_tag(6), 6, latest=False)
    assert checkpoint.resumable_tag(tmp_path) == "step_00000006"
    assert checkpoint.resumable_tag(tmp_path, before_step=6) == "step_00000002"  # a rollback


def test_stale_partial_tags_are_cleaned_and_a_replaced_tag_restored(tmp_path):
    publish_tag(tmp_path, checkpoint.step_tag(2), 2)
    make_tag(tmp_path, checkpoint.PARTIAL + "step_00000004")  # killed mid-save
    (tmp_path / ".latest.tmp-123").write_text("step_00000004")
    make_tag(tmp_path, checkpoint.OLD + "final", {"step": 9})  # killed while replacing final
    removed = checkpoint.clean_stale(tmp_path)
    assert removed == [".latest.tmp-123", ".partial-step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "latest", "step_00000002"]
    assert checkpoint.client_state(tmp_path, "final") == {"step": 9}
    assert checkpoint.latest_tag(tmp_path) == "step_00000002"


def test_republishing_a_tag_replaces_it_whole(tmp_path):
    publish_tag(tmp_path, "final", 5)
    publish_tag(tmp_path, "final", 8)
    assert checkpoint.client_state(tmp_path, "final") == {"step": 8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "latest"]


def test_prune_never_deletes_the_newest_complete_tag(tmp_path):
    for step in (100, 200, 300):
        publish_tag(tmp_path, checkpoint.step_tag(step), step)
    (tmp_path / "step_00000300" / "shard.pt").write_bytes(b"")  # newest is broken
    publish_tag(tmp_path, "final", 300, latest=False)
    deleted = checkpoint.prune(tmp_path, keep_last=1)
    assert deleted == ["step_00000100"]  # 200 survives: the newest *complete* step tag
    assert checkpoint.resumable_tag(tmp_path) == "final"  # newest by step
    assert checkpoint.resumable_tag(tmp_path, before_step=300) == "step_00000200"


def test_resume_from_names_and_paths_locate_their_tags(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for tag, step in (("step_00000004", 4), ("epoch_1", 5), ("step_00000008", 8), ("best", 6)):
        publish_tag(ckpts, tag, step, latest=tag != "best")  # as the trainer saves them
    assert checkpoint.prune(ckpts, keep_last=1) == ["step_00000004"]  # epoch tags are kept
    for name, tag in (("step_8", "step_00000008"), ("epoch_0001", "epoch_1"), ("best", "best")):
        assert checkpoint.locate(run, name) == (ckpts, tag)
    assert checkpoint.locate(run, "latest") == (ckpts, "step_00000008")
    assert checkpoint.locate(tmp_path / "elsewhere", str(ckpts / "epoch_1")) == (ckpts, "epoch_1")
    with pytest.raises(FileNotFoundError, match="its tags: best, epoch_1, step_00000008"):
        checkpoint.locate(run, "epoch_2")


def test_same_size_damage_is_caught_by_content_and_the_previous_tag_used(tmp_path, capsys):
    publish_tag(tmp_path, checkpoint.step_tag(2), 2)
    publish_tag(tmp_path, checkpoint.step_tag(4), 4)
    entry = json.loads((tmp_path / "step_00000004" / checkpoint.MANIFEST).read_text())
    assert len(entry["files"]["shard.pt"][checkpoint.DIGEST]) == 64
    (tmp_path / "step_00000004" / "shard.pt").write_bytes(b"y" * 100)  # same size
    assert checkpoint.incomplete_reason(tmp_path, "step_00000004") is None  # sizes only
    assert checkpoint.resolve(tmp_path) == (tmp_path, "step_00000002")
    err = capsys.readouterr().err
    assert "step_00000004: shard.pt is damaged" in err
    assert "checkpoint: using step_00000002 (step 2)" in err
    # named explicitly: an error naming the damage and the intact tags
    with pytest.raises(ValueError, match=r"shard.pt is damaged.*Intact tags .*: step_00000002"):
        checkpoint.resolve(tmp_path / "step_00000004")
    with pytest.raises(ValueError, match="shard.pt is damaged"):
        checkpoint.locate(tmp_path / "run", str(tmp_path / "step_00000004"))


def test_newest_tag_by_step_wins_over_latest(tmp_path, capsys):
    publish_tag(tmp_path, checkpoint.step_tag(8), 8)
    publish_tag(tmp_path, "final", 12, latest=False)
    publish_tag(tmp_path, "best", 12, latest=False)
    assert checkpoint.resumable_tag(tmp_path) == "final"  # `latest` names an older tag
    assert "using final (step 12), the newest complete tag (`latest` names step_00000008)" in (
        capsys.readouterr().err
    )
    (tmp_path / "latest").unlink()
    assert checkpoint.resolve(tmp_path) == (tmp_path, "final")
    assert "no `latest` file" in capsys.readouterr().err
    checkpoint.write_latest(tmp_path, "final")
    assert checkpoint.resumable_tag(tmp_path) == "final"
    assert capsys.readouterr().err == ""  # latest's own tag: nothing to say


def test_ckpt_verify_reports_each_tag_and_exits_1_on_damage(tmp_path, capsys):
    ckpts = tmp_path / "run" / "checkpoints"
    publish_tag(ckpts, checkpoint.step_tag(2), 2)
    publish_tag(ckpts, checkpoint.step_tag(4), 4)
    assert checkpoint.verify_command(str(tmp_path / "run")) == 0
    assert "step_00000002: OK\nstep_00000004: OK\n2 of 2 tags intact" in capsys.readouterr().out
    with open(ckpts / "step_00000002" / "shard.pt", "r+b") as f:  # one byte, in place
        f.seek(50)
        f.write(b"z")
    assert checkpoint.verify_command(str(ckpts)) == 1
    out = capsys.readouterr().out
    assert "step_00000002: DAMAGED: shard.pt is damaged" in out and "step_00000004: OK" in out
    with pytest.raises(FileNotFoundError, match="no checkpoint tags"):
        checkpoint.verify_command(str(ckpts / "step_00000002"))  # a tag, not a run
