"""Bad-step policy, fault-injection parsing, resume compatibility and the watchdog."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

from dsfm.config.load import to_dict
from dsfm.config.schema import Config, ConfigError
from dsfm.data.format import fingerprint as data_fingerprint
from dsfm.model.config import ModelConfig
from dsfm.testing import faults
from dsfm.train.checkpoint import check_resume_compatible
from dsfm.train.guard import LossGuard, Verdict
from dsfm.train.stop import EXIT_ABORTED, EXIT_HUNG


def test_nonfinite_is_always_skipped_and_streaks_count():
    guard = LossGuard(spike_sigma=0.0, spike_skip=False)
    for loss in (math.nan, math.inf):
        assert guard.judge(loss) == Verdict(skip=True, event="nonfinite")
    guard.record(3, math.nan, applied=False)
    guard.record(4, math.nan, applied=False)
    assert (guard.bad_streak, guard.streak_start, guard.total_bad) == (2, 3, 2)
    guard.record(5, 2.0, applied=True)
    assert (guard.bad_streak, guard.streak_start, guard.total_bad) == (0, None, 2)


def test_spike_needs_history_and_sigma():
    guard = LossGuard(spike_sigma=3.0, spike_skip=True, window=10, min_history=5)
    assert guard.judge(100.0).event is None  # no history yet: the first losses are never spikes
    for i, loss in enumerate([2.0, 2.1, 1.9, 2.05, 1.95]):
        guard.record(i, loss, applied=True)
    assert guard.judge(2.2).event is None  # within mean + 3 std (std ~0.07)
    assert guard.judge(3.0) == Verdict(skip=True, event="spike")
    guard.record(6, 3.0, applied=True, spike=True)  # logged-only spikes do not widen the band
    assert len(guard.history) == 5
    assert LossGuard(0.0, True, window=10).judge(1e9).event is None  # sigma 0: off


def test_fault_spec_parsing_is_strict():
    assert faults.parse(None) == {}
    assert faults.parse("nan_at=3+6-8,rank=1") == {"nan_at": "3+6-8", "rank": "1"}
    assert faults._steps("3+6-8") == {3, 6, 7, 8}
    with pytest.raises(ValueError, match="cannot read 'nan=3'"):
        faults.parse("nan=3")


def make_data(path, vocab=257, tokens=1000, tokenizer="abc"):
    path.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": vocab, "splits": {"train": {"tokens": tokens}}, "sources": []}
    (path / "meta.json").write_text(__import__("json").dumps(meta))
    (path / "tokenizer.json").write_text(tokenizer)
    return path


def test_resume_check_names_model_tokenizer_and_dataset_fields(tmp_path):
    old = make_data(tmp_path / "old")
    cfg = Config(model=ModelConfig(vocab_size=257, n_layers=2, d_model=64, n_heads=4))
    cfg.model = cfg.model.filled()
    cfg.data.path = str(old)
    saved = {"config": to_dict(cfg), "data_fingerprint": data_fingerprint([("d", str(old), 1.0)])}
    same = data_fingerprint([("d", str(old), 1.0)])
    check_resume_compatible(saved, cfg, tmp_path, same)  # same: fine

    new = make_data(tmp_path / "new", tokens=2000, tokenizer="xyz")
    cfg.data.path = str(new)
    with pytest.raises(ConfigError) as e:
        check_resume_compatible(saved, cfg, tmp_path, data_fingerprint([("d", str(new), 1.0)]))
    text = str(e.value)
    assert "different tokenizer or dataset" in text and "allow_data_change=true" in text
    assert "tokenizer: checkpoint" in text and "dataset: checkpoint" in text
    cfg.checkpoint.allow_data_change = True  # the explicit override
    check_resume_compatible(saved, cfg, tmp_path, data_fingerprint([("d", str(new), 1.0)]))

    cfg.model.n_layers = 3  # a shape change is never overridable: the weights would not load
    with pytest.raises(ConfigError, match="model.n_layers: checkpoint 2 vs config 3"):
        check_resume_compatible(saved, cfg, tmp_path, data_fingerprint([("d", str(new), 1.0)]))


def test_resume_check_compares_the_family_and_reads_checkpoints_from_before_it(tmp_path):
    data = make_data(tmp_path / "d")
    cfg = Config(model=ModelConfig(vocab_size=257, n_layers=2, d_model=64, n_heads=4).filled())
    cfg.data.path = str(data)
    fingerprint = data_fingerprint([("d", str(data), 1.0)])
    saved = {"config": to_dict(cfg), "data_fingerprint": fingerprint}
    del saved["config"]["model"]["family"]  # written before the field existed: a llama
    check_resume_compatible(saved, cfg, tmp_path, fingerprint)
    cfg.model.family = "qwen2"  # bias tensors the checkpoint does not have
    with pytest.raises(ConfigError, match="model.family: checkpoint 'llama' vs config 'qwen2'"):
        check_resume_compatible(saved, cfg, tmp_path, fingerprint)


def test_watchdog_reports_rank_phase_and_step_then_exits():
    code = textwrap.dedent(
        """
        import time
        from dsfm.train.stop import Watchdog
        w = Watchdog(0.5, rank=3)
        w.beat(41, "step")
        time.sleep(30)  # a hung collective
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_HUNG
    assert "rank 3 stuck" in proc.stderr and "in step after step 41" in proc.stderr


@pytest.mark.parametrize(
    "signals, window, status",
    [
        ("INT TERM", 5.0, 0),  # Ctrl-C, then the launcher passing it on: one request
        ("INT TERM TERM", 5.0, EXIT_ABORTED),  # a further SIGTERM is a second request
        ("INT INT", 5.0, EXIT_ABORTED),  # a second Ctrl-C stops at once
        ("TERM TERM", 5.0, EXIT_ABORTED),
        ("USR1 TERM", 5.0, EXIT_ABORTED),  # Slurm's notice, then its time limit
        ("INT TERM", 0.0, EXIT_ABORTED),  # a SIGTERM long after the Ctrl-C is another request
    ],
)
def test_stop_signal_counts_a_launchers_forwarded_ctrl_c_once(signals, window, status):
    code = textwrap.dedent(
        f"""
        import os, signal, time
        from dsfm.train import stop
        stop.FORWARD_WINDOW_S = {window}
        s = stop.StopSignal()
        for name in {signals.split()!r}:
            os.kill(os.getpid(), getattr(signal, "SIG" + name))
            time.sleep(0.05)  # the handler runs between bytecodes
        assert s.received
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stdout + proc.stderr
