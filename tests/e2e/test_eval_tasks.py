"""`dsfm eval --tasks`: lm-evaluation-harness on a training run's checkpoint, offline."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import run_cmd

pytestmark = pytest.mark.distributed  # the fixture trains with DeepSpeed

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def dsfm_eval(*args: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "dsfm.cli", "eval", *args]
    return run_cmd(cmd, check=False, env={**OFFLINE, **(env or {})})


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """A multiple-choice task of our own over a local JSONL file."""
    root = tmp_path_factory.mktemp("tasks")
    docs = [
        {"q": f"Say {w}.", "choices": [f"{w}!", f"{o}!"], "gold": i % 2}
        for i, (w, o) in enumerate([("tiger", "stone"), ("ocean", "cloud"), ("bread", "apple")])
    ]
    for d in docs:  # the gold answer is the word asked for
        d["choices"] = d["choices"] if d["gold"] == 0 else d["choices"][::-1]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs * 2))
    (root / "say_word.yaml").write_text(
        "task: say_word\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return root


def test_benchmark_table_and_results_beside_the_run(chat_run, tasks_dir):
    args = [str(chat_run), "--tasks", "say_word", "--include-path", str(tasks_dir)]
    proc = dsfm_eval(*args, "--limit", "4", "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr
    assert "say_word" in proc.stdout and "acc" in proc.stdout
    scoring = [line for line in proc.stderr.splitlines() if line.startswith("scoring:")]
    assert scoring and "100% 8/8 requests" in scoring[-1] and "| eta" in scoring[-1], proc.stderr
    saved = chat_run / "eval" / "final_say_word.json"
    assert f"saved {saved}" in " ".join(proc.stdout.split())
    result = json.loads(saved.read_text())
    assert result["n-samples"]["say_word"] == {"original": 6, "effective": 4}
    assert result["checkpoint"].endswith("checkpoints/final") and result["limit"] == 4
    acc = result["results"]["say_word"]["acc,none"]
    assert acc in (0, 0.25, 0.5, 0.75, 1)
    assert "|say_word|" in saved.with_suffix(".md").read_text().replace(" ", "")

    proc = dsfm_eval(*args, "--json")  # every document; one JSON object
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["n-samples"]["say_word"]["effective"] == 6 and printed["limit"] is None
    assert json.loads(saved.read_text()) == printed


def test_clear_errors_before_any_weights_are_read(chat_run, tasks_dir, tmp_path):
    def one_line_error(proc, *needles):
        assert proc.returncode == 2 and not proc.stdout
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        for needle in needles:
            assert needle in proc.stderr

    one_line_error(
        dsfm_eval(
            str(chat_run), "--tasks", "say_word,no_such_task", "--include-path", str(tasks_dir)
        ),
        "unknown task(s) no_such_task",
        "`lm-eval ls tasks`",
        "--include-path",
    )
    # lm_eval not installed: a package of that name that fails to import stands in for it
    (tmp_path / "lm_eval").mkdir()
    (tmp_path / "lm_eval" / "__init__.py").write_text("raise ImportError('no lm_eval here')\n")
    one_line_error(
        dsfm_eval(str(chat_run), "--tasks", "hellaswag", env={"PYTHONPATH": str(tmp_path)}),
        "pip install 'dsfm[eval]'",
    )
    one_line_error(
        dsfm_eval(str(chat_run), "--tasks", "say_word", "--data", str(tmp_path)), "not both"
    )
    one_line_error(dsfm_eval(str(chat_run)), "or neither")
    one_line_error(
        dsfm_eval(str(chat_run), "--data", str(tmp_path), "--limit", "3"),
        "--limit is only for --tasks",
    )
