"""Validation during training: when it runs, the val loss, and the sample generations.

Design choices:
- The val set is the same fixed samples at every eval (the first ones of the split, split
  contiguously across ranks), so evals are comparable across steps and runs; a blend is
  evaluated per source and the blended loss is the token-weighted total (`dsfm.eval.loss`).
- Every rank runs the same forwards and generations: ZeRO-3 forwards are collective. The
  loss is all-reduced, so every rank sees the same number (early stopping relies on it).
- Generations use their own seeded generator (`dsfm.eval.generate`), never the global RNG,
  so an exact resume is not disturbed by evals.
- `due(step, last)` decides when to validate, so the training loop only asks.
- A document-masked model (`model.doc_mask`) is validated with the same masking.
"""

from __future__ import annotations

from typing import Any

import torch

from dsfm.config.schema import EvalConfig
from dsfm.data.blend import BlendedDataset
from dsfm.data.chat import prompt_ids
from dsfm.data.dataset import TokenDataset
from dsfm.data.tokenizer import Tokenizer
from dsfm.eval.generate import sample
from dsfm.eval.loss import blend_val_metrics, eval_indices, mean_loss, val_metrics


class Validator:
    def __init__(
        self,
        cfg: EvalConfig,
        data: TokenDataset | BlendedDataset | None,
        tokenizer: Tokenizer,
        *,
        chat: bool,
        micro_batch_size: int,
        rank: int,
        world: int,
        device: torch.device,
        seed: int,
        doc_mask: bool = False,
    ):
        self.cfg, self.data, self.tokenizer, self.chat = cfg, data, tokenizer, chat
        self.doc_mask = doc_mask
        self.micro, self.rank, self.world, self.device, self.seed = (
            micro_batch_size,
            rank,
            world,
            device,
            seed,
        )

    def due(self, step: int, last: bool) -> bool:
        """Every `eval.every` steps and at the last step, when there is a val split."""
        every = self.cfg.every and step % self.cfg.every == 0
        return self.data is not None and (last or bool(every))

    @torch.no_grad()
    def loss(self, forward: Any) -> dict[str, Any]:
        """`val_loss`, `val_ppl` (and a blend's `val_loss/<source>`), equal on every rank."""
        n_samples = self.cfg.batches * self.micro * self.world
        if isinstance(self.data, BlendedDataset):
            return blend_val_metrics(
                forward,
                self.data,
                n_samples,
                self.micro,
                self.rank,
                self.world,
                self.device,
                doc_mask=self.doc_mask,
            )
        indices = eval_indices(self.data, n_samples, self.rank, self.world)
        loss = mean_loss(
            forward, self.data, indices, self.micro, self.device, doc_mask=self.doc_mask
        )
        return val_metrics(loss)

    def samples(self, model: torch.nn.Module, step: int) -> list[dict[str, Any]]:
        """One generation per `eval.prompts` entry, as rows for samples.jsonl."""
        rows = []
        for i, prompt in enumerate(self.cfg.prompts):
            ids, stop_id = prompt_ids(self.tokenizer, prompt, chat=self.chat)
            new = sample(
                model,
                ids,
                max_new_tokens=self.cfg.max_new_tokens,
                temperature=self.cfg.temperature,
                top_k=self.cfg.top_k,
                seed=self.seed + i,
                eot_id=stop_id,
            )
            rows.append({"step": step, "prompt": prompt, "completion": self.tokenizer.decode(new)})
        return rows
