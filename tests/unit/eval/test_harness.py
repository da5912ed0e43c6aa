"""dsfm's model under lm-evaluation-harness: the numbers lm_eval gets are the model's own."""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval.api.instance import Instance

from dsfm.data.tokenizer import train_bpe
from dsfm.eval.benchmark import parse_tasks, result_rows, run_benchmarks, task_manager
from dsfm.eval.generate import sample
from dsfm.eval.harness import DsfmLM
from dsfm.model.config import ModelConfig
from dsfm.model.gpt import GPT, IGNORE_INDEX

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "Rome"], "gold": 0},
    {"question": "def f(x):\n    return", "choices": ["x", "x + 1", "None"], "gold": 1},
    {"question": "Two plus two  ", "choices": ["equals four", "is five"], "gold": 0},
    {"question": "", "choices": ["import os", "import sys"], "gold": 1},  # empty context
    {"question": "word " * 40, "choices": ["end", "stop"], "gold": 0},  # longer than the model
]


def write_task(root, name: str = "dsfm_tiny_mc"):
    """A multiple-choice task over local JSONL, as users define their own (no network)."""
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return root


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    """lm_eval's task index plus our task (indexing every lm_eval YAML takes seconds)."""
    return task_manager(str(write_task(tmp_path_factory.mktemp("tasks"))))


@pytest.fixture(scope="module")
def lm_parts():
    text = [d["question"] + " " + c for d in DOCS for c in d["choices"]] * 20
    tokenizer = train_bpe(text + ["The quick brown fox jumps over the lazy dog."] * 20, 300)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        max_seq_len=32,
    )
    model = GPT(cfg).eval()
    with torch.no_grad():  # peaked distributions, so choices score differently
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return model, tokenizer


def own_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """-(sum of the model's own cross-entropy) over the continuation's tokens.

    The text is split as lm_eval documents it: the context's trailing spaces belong to the
    continuation, the pair is encoded whole, and an empty context is the EOT token.
    """
    if context:
        stripped = context.rstrip()
        context_ids = tokenizer.encode(stripped)
        ids = tokenizer.encode(context + continuation)
    else:
        context_ids = [tokenizer.eot_id]
        ids = context_ids + tokenizer.encode(continuation)
    return own_ids_loglikelihood(model, context_ids, ids[len(context_ids) :])


def own_ids_loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    n = len(continuation_ids)
    ids = (context_ids + continuation_ids)[-(model.cfg.max_seq_len + 1) :]  # a long input's tail
    labels = torch.tensor([ids[1:]])
    labels[0, : labels.shape[1] - n] = IGNORE_INDEX
    with torch.no_grad():
        return -float(model(torch.tensor([ids[:-1]]), labels=labels)) * n


def test_multiple_choice_loglikelihoods_are_the_models_own(lm_parts, manager):
    model, tokenizer = lm_parts
    out = run_benchmarks(
        model,
        tokenizer,
        ["dsfm_tiny_mc"],
        manager,
        batch_size=3,
        log_samples=True,
        progress=False,
    )
    samples = out["samples"]["dsfm_tiny_mc"]
    assert len(samples) == len(DOCS)
    correct = []
    for s in samples:
        got = [resp[0][0] for resp in s["resps"]]
        expected = [own_loglikelihood(model, tokenizer, *args) for args in s["arguments"]]
        # every choice of every doc, padded in batches of 3, equals the loss path's number
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        correct.append(max(range(len(got)), key=got.__getitem__) == s["doc"]["gold"])
    assert out["results"]["dsfm_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(DOCS))
    rows = result_rows(out)
    assert [r[3] for r in rows] == ["acc"] and rows[0][4] == f"{sum(correct) / len(DOCS):.4f}"


def test_rolling_loglikelihood_is_the_whole_texts(lm_parts):
    model, tokenizer = lm_parts
    lm = DsfmLM(model, tokenizer, progress=False)
    short = "The quick brown fox"
    long = "The quick brown fox jumps over the lazy dog. " * 6  # several windows of 32
    n_long = len(tokenizer.encode(long))
    assert n_long > 2 * model.cfg.max_seq_len
    got = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), 0) for t in (short, long)]
    )
    assert got[0] == pytest.approx(own_loglikelihood(model, tokenizer, "", short), abs=1e-5)
    # each token of the long text is scored once, in chunks of max_seq_len tokens, each
    # with the rest of its window as context (the first after EOT)
    ids, size = tokenizer.encode(long), model.cfg.max_seq_len
    chunks = []
    for i in range(0, len(ids), size):
        end = min(i + size, len(ids))
        context = ids[end - size - 1 : i] if i else [tokenizer.eot_id]
        chunks.append(own_ids_loglikelihood(model, context, ids[i:end]))
    assert got[1] == pytest.approx(sum(chunks), abs=1e-4)


def test_generate_until_is_greedy_sampling_cut_at_the_stop_string(lm_parts):
    model, tokenizer = lm_parts
    lm = DsfmLM(model, tokenizer, progress=False)
    context = "The capital of France is"
    greedy = tokenizer.decode(
        sample(
            model,
            tokenizer.encode(context),
            max_new_tokens=12,
            temperature=0,
            eot_id=tokenizer.eot_id,
        )
    )
    stop = greedy[3:5]
    request = Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 12}), 0)
    assert lm.generate_until([request]) == [greedy.split(stop)[0]]
    request = Instance("generate_until", {}, (context, {"until": ["\x00"], "max_gen_toks": 12}), 0)
    assert lm.generate_until([request]) == [greedy]


def test_unknown_task_names_the_way_to_list_tasks(manager, tmp_path):
    assert parse_tasks("dsfm_tiny_mc, ", manager) == ["dsfm_tiny_mc"]
    with pytest.raises(ValueError, match=r"unknown task\(s\) no_such_task; `lm-eval ls tasks`"):
        parse_tasks("dsfm_tiny_mc,no_such_task", manager)
    with pytest.raises(FileNotFoundError, match="--include-path"):
        task_manager(str(tmp_path / "missing"))


def test_few_shot_contexts_and_limit(lm_parts, manager):
    model, tokenizer = lm_parts
    out = run_benchmarks(
        model,
        tokenizer,
        ["dsfm_tiny_mc"],
        manager,
        limit=2,
        num_fewshot=1,
        log_samples=True,
        progress=False,
    )
    assert out["n-shot"]["dsfm_tiny_mc"] == 1
    samples = out["samples"]["dsfm_tiny_mc"]
    assert len(samples) == 2
    for s in samples:
        context = s["arguments"][0][0]
        assert context.endswith(s["doc"]["question"]) and len(context) > len(s["doc"]["question"])
        got = [resp[0][0] for resp in s["resps"]]
        expected = [own_loglikelihood(model, tokenizer, *args) for args in s["arguments"]]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_family_that_starts_texts_with_bos_is_scored_after_bos(tmp_path):
    from dsfm.data.tokenizer import Tokenizer
    from tests.family_tokenizers import llama3

    tokenizer = Tokenizer.load(llama3(tmp_path, instruct=False))
    assert tokenizer.add_bos
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            n_layers=1,
            d_model=32,
            n_heads=2,
            n_kv_heads=1,
            ffn_hidden=64,
            max_seq_len=32,
        )
    ).eval()
    lm = DsfmLM(model, tokenizer, batch_size=2, progress=False)
    pairs = [("The capital of France is", " Paris"), ("", "import os")]
    got = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs])]
    bos = tokenizer.bos_id
    context = [bos, *tokenizer.encode(pairs[0][0])]
    whole = [bos, *tokenizer.encode("".join(pairs[0]))]
    expected = [
        own_ids_loglikelihood(model, context, whole[len(context) :]),
        own_ids_loglikelihood(model, [bos], tokenizer.encode(pairs[1][1])),
    ]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
