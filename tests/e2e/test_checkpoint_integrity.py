"""Damaged and untrusted checkpoints through the `dsfm` command: content hashes catch
same-size damage (the previous tag is used), and a pickle that would run code is refused by
every command unless --trust-checkpoint."""

from __future__ import annotations

import fractions
import json
import shutil

import pytest
import torch

from dsfm.train import checkpoint
from tests.conftest import TINY, dsfm

MODEL_STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def run(byte_data, tmp_path_factory):
    """A ZeRO-0 run with step_00000002 and final (step 4, `latest`)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    dsfm(
        "train",
        *TINY,
        f"data.path={byte_data}",
        f"train.out_dir={out}",
        "train.max_steps=4",
        "checkpoint.every=2",
        "checkpoint.save_best=false",
        "eval.every=0",
    )
    return out


@pytest.fixture
def copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def test_same_size_damage_falls_back_to_the_previous_tag(copy, byte_data):
    final = copy / "checkpoints" / "final"
    size = (final / MODEL_STATES).stat().st_size
    overwrite(final / MODEL_STATES, size // 2, b"\xff" * 4096)  # inside the weights
    assert (final / MODEL_STATES).stat().st_size == size

    evaluated = dsfm("eval", str(copy), "--data", str(byte_data), "--json")
    generated = dsfm("generate", str(copy), "--max-new-tokens", "4")
    for proc in (evaluated, generated):
        assert f"skipping checkpoint {final}: {MODEL_STATES} is damaged" in proc.stderr
        assert "checkpoint: using step_00000002 (step 2)" in proc.stderr
    assert json.loads(evaluated.stdout)["loss"] < 10  # the intact weights, not NaN

    verify = dsfm("ckpt", "verify", str(copy), check=False)
    assert verify.returncode == 1
    assert f"final: DAMAGED: {MODEL_STATES} is damaged" in verify.stdout
    assert "step_00000002: OK" in verify.stdout

    named = dsfm("generate", str(final), check=False)  # named explicitly: an error
    assert named.returncode == 2 and "Traceback" not in named.stderr
    assert "is damaged" in last_line(named) and "Intact tags" in last_line(named)


def test_damaged_header_falls_back_without_a_traceback(copy):
    final = copy / "checkpoints" / "final"
    overwrite(final / MODEL_STATES, 0, b"\0" * 64)
    proc = dsfm("generate", str(copy), "--max-new-tokens", "4")
    assert "Traceback" not in proc.stderr and "UnpicklingError" not in proc.stderr
    assert f"skipping checkpoint {final}" in proc.stderr


def test_train_resumes_from_the_newest_intact_tag(copy, byte_data):
    final = copy / "checkpoints" / "final"
    overwrite(final / MODEL_STATES, 100, b"\x01" * 16)
    proc = dsfm(
        "train",
        *TINY,
        f"data.path={byte_data}",
        f"train.out_dir={copy}",
        "train.max_steps=6",
        "checkpoint.every=2",
        "eval.every=0",
    )
    assert f"skipping checkpoint {final}: {MODEL_STATES} is damaged" in proc.stderr
    assert f"resumed from {copy / 'checkpoints' / 'step_00000002'} at step 2" in proc.stdout


class Planted:
    """A pickle that writes a marker file when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("victim", ["rng_rank0.pt", MODEL_STATES])
def test_a_malicious_pickle_is_refused_by_every_command(copy, byte_data, tmp_path, victim):
    marker = tmp_path / "pwned"
    final = copy / "checkpoints" / "final"
    torch.save({"module": Planted(marker)}, final / victim)
    checkpoint.write_manifest(final)  # the attacker fixes the manifest too
    commands = [
        ("generate", str(copy), "--max-new-tokens", "4"),
        ("eval", str(copy), "--data", str(byte_data)),
        ("export", str(copy), "--out", str(tmp_path / "hf")),
        ("merge", str(copy), "--out", str(tmp_path / "merged")),
        (
            "train",
            *TINY,
            f"data.path={byte_data}",
            f"train.out_dir={copy}",
            "train.max_steps=6",
            "eval.every=0",
        ),
    ]
    for args in commands:
        proc = dsfm(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        line = last_line(proc)
        assert victim in line and "--trust-checkpoint" in line and "open)" in line
        assert "Traceback" not in proc.stderr
        assert not marker.exists()


def test_trust_checkpoint_loads_a_non_allowlisted_object(copy, byte_data):
    final = copy / "checkpoints" / "final"
    states = torch.load(final / MODEL_STATES, weights_only=False)
    states["note"] = fractions.Fraction(1, 3)  # benign, but not on the allowlist
    torch.save(states, final / MODEL_STATES)
    checkpoint.write_manifest(final)
    refused = dsfm("generate", str(copy), "--max-new-tokens", "4", check=False)
    assert refused.returncode == 2 and "fractions.Fraction" in last_line(refused)
    assert dsfm("generate", str(copy), "--max-new-tokens", "4", "--trust-checkpoint")
    proc = dsfm(  # the engine path (DeepSpeed's load_checkpoint) too
        "train",
        *TINY,
        f"data.path={byte_data}",
        f"train.out_dir={copy}",
        "train.max_steps=6",
        "checkpoint.every=2",
        "eval.every=0",
        "--trust-checkpoint",
    )
    assert f"resumed from {final} at step 4" in proc.stdout
