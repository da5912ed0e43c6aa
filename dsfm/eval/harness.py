"""dsfm's model as an lm-evaluation-harness language model (`DsfmLM`), for `dsfm eval --tasks`.

Design choices:
- An `lm_eval` model over the `GPT` itself, not an export to a temporary Hugging Face
  directory for lm_eval's HFLM: any tag loads as it is (ZeRO shards, LoRA runs folded in by
  `load_model`), with no copy of the weights on disk and no second implementation of the
  architecture between the checkpoint and the scores.
- `TemplateLM` does the text side the way HFLM does (trailing spaces of the context move
  to the continuation; the pair is encoded whole and split, so the continuation's ids are
  those of the full text; an empty context is conditioned on the prefix token). Where the
  tokenizer's family starts texts with BOS (`Tokenizer.add_bos`), contexts start with it
  and it is the prefix token, as in training data and transformers' encoding; otherwise
  the prefix is EOT, the token every training document follows. Scores are then plain
  sums of log-softmax over the continuation's positions.
- Requests are scored longest first in batches of `batch_size`, right-padded. Attention is
  causal, so a row's padding comes after every position that is read: padding changes no
  score (the test compares against the model's own loss, 1e-5).
- Inputs longer than the model's `max_seq_len` keep their last `max_seq_len` tokens, as
  HFLM does; rolling log-likelihoods (perplexity tasks) use lm_eval's own windows.
- `generate_until` samples through `generate.stream` (greedy unless the task asks to
  sample) and stops at EOT or as soon as the decoded text holds a stop string.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dsfm.data.tokenizer import Tokenizer
from dsfm.eval.generate import stream, stream_text
from dsfm.model.gpt import GPT
from dsfm.progress import Tracker

DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's default for generation tasks


class DsfmLM(TemplateLM):
    def __init__(
        self, model: GPT, tokenizer: Tokenizer, batch_size: int = 8, progress: bool = True
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tok = tokenizer  # not `tokenizer`: lm_eval reads that as a transformers one
        self.batch_size = batch_size
        self.progress = progress
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS where the family starts texts with it, else EOT."""
        return self.tok.bos_id if self.tok.add_bos else self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """The text's ids, after BOS where the family adds one (as training documents and
        transformers' encoding have it) unless lm_eval asks for none."""
        ids = self.tok.encode(string)
        bos = self.tok.add_bos and add_special_tokens is not False
        return [self.tok.bos_id, *ids] if bos else ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    # --- scoring

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **_
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it) each."""
        rows = []
        for _, context, continuation in requests:
            if not 1 <= len(continuation) <= self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens cannot be scored by a model "
                    f"of max_seq_len {self.max_length}"
                )
            rows.append((context + continuation)[-(self.max_length + 1) :][:-1])
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        with Tracker(enabled=self.progress and not disable_tqdm, transient=True) as bar:
            task = bar.add_task("scoring", len(rows), "requests")
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                width = len(rows[batch[0]])
                ids = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
                for b, i in enumerate(batch):
                    ids[b, : len(rows[i])] = torch.tensor(rows[i])
                logits = self.model(ids.to(self._device))  # (B, T, V)
                for b, i in enumerate(batch):
                    continuation = requests[i][2]
                    end = len(rows[i])
                    scores = logits[b, end - len(continuation) : end].float().log_softmax(-1)
                    target = torch.tensor(continuation, device=scores.device)
                    picked = scores.gather(-1, target[:, None])[:, 0]  # (n_cont,)
                    greedy = bool((scores.argmax(-1) == target).all())
                    results[i] = (float(picked.sum()), greedy)
                bar.update(task, advance=len(batch))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each whole text's log-likelihood, in lm_eval's windows of the model's length."""
        windows, owner = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    self.tok_encode(text, add_special_tokens=False),
                    self.prefix_token_id,
                    self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (score, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[n] += score
        return totals

    # --- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        with Tracker(enabled=self.progress and not disable_tqdm, transient=True) as bar:
            task = bar.add_task("generating", len(requests), "requests")
            for request in requests:
                out.append(self._generate_one(request))
                bar.update(task, advance=1)
        return out

    def _generate_one(self, request) -> str:
        context, kwargs = request.args
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or [self.tok.decode([self.eot_token_id])]
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(kwargs.pop("temperature", 0.0))
        if not kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        keep = max(1, self.max_length - max_new)  # room for the answer, as HFLM leaves
        ids = (self.tok_encode(context) or [self.prefix_token_id])[-keep:]
        tokens = stream(
            self.model,
            ids,
            max_new_tokens=max_new,
            temperature=temperature,
            top_k=kwargs.pop("top_k", None),
            top_p=kwargs.pop("top_p", None),
            seed=0,
            eot_id=self.eot_token_id,
        )
        text = ""
        for piece in stream_text(self.tok, tokens):
            text += piece
            if any(stop in text for stop in until):
                break
        for stop in until:
            text = text.split(stop)[0]
        return text
