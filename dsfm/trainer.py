"""The pretraining loop: build components, step, evaluate, sample, checkpoint, log.

Everything else (config, data, model, DeepSpeed, checkpoint files, metrics) lives in
its own module; this one only orchestrates. `launchers/pretrain.py` under `deepspeed`
and `dsfm train` in one process both call `run()`.

Preemption: SIGUSR1 (Slurm's `--signal`) or SIGTERM makes every rank finish the current
step, save a checkpoint and exit with EXIT_REQUEUE, which the sbatch scripts read as "put
me back in the queue"; a second signal exits at once. Ranks agree on stopping through the
same all-reduce that averages the loss, so a signal seen by one rank stops all of them.

Reliability (dsfm/faults.py, dsfm/watchdog.py, dsfm/resume.py, checkpoint.py): a step
with a non-finite loss (or a loss spike, with train.spike_skip) is skipped on every rank
alike and logged; a streak of them rolls back to an older checkpoint and keeps going past the
bad data; a rank that stops making progress makes the job exit non-zero; checkpoints are
published atomically and resume falls back past an incomplete newest tag.

Early stopping (eval.patience, dsfm/monitor.py): every rank sees the same all-reduced val
loss, so all stop at the same eval, save `final` and exit 0; the stopped state is in the
client state, so restarting the run trains no further.

Exact resume: the whole training state is the DeepSpeed engine state (weights, ZeRO
optimizer shards, LR schedule), the sampler's `consumed_samples`, per-rank RNG states
and a few counters in the client state. Eval and sampling never touch the global RNG.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from dsfm import checkpoint, dist, evaluate, faults
from dsfm import engine as ds_engine
from dsfm.config import Config, ConfigError, check, from_dict, load_config, save_config, to_dict
from dsfm.data.blend import BlendedDataset, open_split
from dsfm.data.dataset import TokenDataset
from dsfm.data.sampler import Sampler
from dsfm.finetune import prompt_ids
from dsfm.generate import sample
from dsfm.lora import apply_lora, resize_token_embeddings
from dsfm.metrics import RunLogger, finite_or_none, mfu, peak_flops
from dsfm.model.gpt import GPT
from dsfm.monitor import EarlyStopping
from dsfm.resume import check_resume_compatible, data_fingerprint
from dsfm.runs import checkpoint_tags
from dsfm.tokenizer import Tokenizer
from dsfm.watchdog import Watchdog

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal after saving; run again to continue
EXIT_ABORTED = 143  # a second signal: stopped at once, no checkpoint


def run(config_path: str | None, ds_path: str, overrides: list[str]) -> dict[str, Any]:
    """Validate everything, then train. Returns the final summary (on every rank)."""
    launch = dist.ensure_env()
    cfg, ds = resolve_configs(config_path, ds_path, overrides, dist.world_size())
    dist.print0(dist.describe(launch))
    # The watchdog names the stuck rank; the backend timeout, later, is the backstop.
    ds_engine.init_distributed(2 * cfg.train.watchdog_s)
    trainer = Trainer(cfg, ds)
    return trainer.fit()


def resolve_configs(
    config_path: str | None, ds_path: str, overrides: list[str], world_size: int
) -> tuple[Config, dict[str, Any]]:
    """Both configs resolved, or one ConfigError listing every problem in either."""
    problems: list[str] = []
    cfg = None
    try:
        cfg = load_config(config_path, overrides, world_size=world_size)
    except ConfigError as e:
        problems += e.problems
    if cfg is not None and cfg.train.init_from:
        try:
            adopt_init_model(cfg)
            problems += check(cfg, world_size)
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"train.init_from: {e}")
    try:
        ds = ds_engine.read_ds_config(ds_path)
        if cfg is not None:
            ds = ds_engine.fill_ds_config(ds, cfg, world_size)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cfg, ds


def adopt_init_model(cfg: Config) -> None:
    """With train.init_from the architecture is the source checkpoint's; only dropout is ours,
    and the vocabulary grows to the data's when fine-tuning data added tokens (chat)."""
    src = from_dict(checkpoint.client_state(*checkpoint.resolve(cfg.train.init_from))["config"])
    data_vocab = cfg.model.vocab_size  # filled from the dataset by the config check
    cfg.model = dataclasses.replace(
        src.model, dropout=cfg.model.dropout, vocab_size=max(src.model.vocab_size, data_vocab)
    )


def build_model(cfg: Config) -> GPT:
    """A fresh model, or train.init_from's weights with grown embeddings; LoRA if asked."""
    src_vocab = cfg.model.vocab_size
    if cfg.train.init_from is None:
        model = GPT(cfg.model)
    else:
        ckpt_dir, tag = checkpoint.resolve(cfg.train.init_from)
        state = checkpoint.client_state(ckpt_dir, tag)
        src_vocab = state["config"]["model"]["vocab_size"]
        model = GPT(dataclasses.replace(cfg.model, vocab_size=src_vocab))
        checkpoint.load_into(model, checkpoint.load_weights(ckpt_dir, tag, state), ckpt_dir / tag)
        if cfg.model.vocab_size > src_vocab:
            resize_token_embeddings(model, cfg.model.vocab_size)
    if cfg.lora.rank > 0:
        apply_lora(
            model,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            targets=cfg.lora.targets,
        )
        if model.cfg.vocab_size > src_vocab:
            # New tokens (chat) start as identical mean rows; frozen they could never be told
            # apart or produced, so embedding and head train in full (peft's modules_to_save).
            model.embed_tokens.weight.requires_grad_(True)
            model.lm_head.weight.requires_grad_(True)
    return model


class Trainer:
    def __init__(self, cfg: Config, ds: dict[str, Any]):
        self.cfg, self.ds = cfg, ds
        t = cfg.train
        self.rank, self.world = dist.rank(), dist.world_size()
        self.run_dir = Path(t.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = ds_engine.device()
        self.global_batch = t.micro_batch_size * t.grad_accum * self.world

        self.train_data = open_data(cfg, "train")
        self.val_data = self._val_split()
        self.tokenizer_path = Path(cfg.data.sources()[0][1]) / "tokenizer.json"
        self.tokenizer = Tokenizer.load(self.tokenizer_path)

        if dist.is_rank0():  # what a killed save left behind, before anyone reads the dir
            checkpoint.clean_stale(self.ckpt_dir)
        barrier()
        self.data_fingerprint = data_fingerprint(cfg.data.sources())
        resume_tag = checkpoint.resumable_tag(self.ckpt_dir)
        if resume_tag is not None:  # refuse a mismatched checkpoint before building anything
            saved = checkpoint.client_state(self.ckpt_dir, resume_tag)
            check_resume_compatible(saved, cfg, self.ckpt_dir / resume_tag, self.data_fingerprint)

        seed_everything(t.seed)  # same init on every rank
        model = build_model(cfg)
        self.flops_per_token = model.flops_per_token(t.seq_len)
        self.n_params = model.num_params()
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.engine = ds_engine.initialize(
            model, ds, cfg.optim.weight_decay, compile=t.compile
        )
        # DeepSpeed's WarmupCosineLR gives the first two updates lr=0; start one step in so
        # update k (0-based) uses lr*(k+1)/warmup and the last update lands on min_lr_ratio.
        self.engine.lr_scheduler.step(1)
        self.base_lrs = ds_engine.base_lrs(self.engine)
        seed_everything(t.seed + 1000 * self.rank)  # dropout streams differ per rank

        # A blend orders its own samples (per-source shuffles); the sampler only counts.
        self.sampler = Sampler(
            len(self.train_data),
            self.global_batch,
            self.rank,
            self.world,
            seed=t.seed,
            shuffle=not isinstance(self.train_data, BlendedDataset),
        )
        self.step, self.tokens, self.elapsed_s = 0, 0, 0.0
        self.best_val_loss = math.inf
        self.early = EarlyStopping(cfg.eval.patience, cfg.eval.min_delta)
        self.peak = peak_flops(self.device)
        self.guard = faults.LossGuard(t.spike_sigma, t.spike_skip)
        self.lr_scale, self.rollbacks = 1.0, 0
        self.watchdog: Watchdog | None = None

        if dist.is_rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
            shutil.copyfile(self.tokenizer_path, self.run_dir / "tokenizer.json")
        barrier()
        if resume_tag is not None:
            self._resume(resume_tag)

    def _val_split(self) -> TokenDataset | BlendedDataset | None:
        try:
            data = open_data(self.cfg, "val", warn=lambda m: dist.print0(f"warning: {m}"))
        except ValueError as e:
            dist.print0(f"warning: no validation ({e})")
            return None
        if len(data) < self.world:
            dist.print0(
                f"warning: validation split has {len(data)} samples for {self.world} "
                "ranks; skipping validation"
            )
            return None
        return data

    def _resume(self, tag: str) -> None:
        state = self._load(tag)
        self.sampler.load_state_dict(state["sampler"])
        self.guard.total_bad = state.get("bad_steps", 0)
        dist.print0(f"resumed from {self.ckpt_dir / tag} at step {self.step}")

    def _load(self, tag: str) -> dict[str, Any]:
        """Engine state and counters of `tag` (the sampler is the caller's choice)."""
        state = checkpoint.load(self.engine, self.ckpt_dir, tag)
        self.step, self.tokens = state["step"], state["tokens"]
        self.elapsed_s, self.best_val_loss = state["elapsed_s"], state["best_val_loss"]
        self.lr_scale, self.rollbacks = state.get("lr_scale", 1.0), state.get("rollbacks", 0)
        if "early_stopping" in state:
            self.early.load_state_dict(state["early_stopping"])
        ds_engine.set_lr_scale(self.engine, self.base_lrs, self.lr_scale)
        return state

    def _rollback(self, log: RunLogger) -> None:
        """After max_bad_steps skipped steps in a row: back to the newest checkpoint from
        before the streak, keeping the data position so the offending batches are not seen
        again (and lowering the LR if train.rollback_lr_scale < 1)."""
        first_bad, from_step = self.guard.streak_start, self.step
        tag = checkpoint.resumable_tag(self.ckpt_dir, before_step=first_bad)
        if tag is None:
            raise RuntimeError(
                f"{self.guard.bad_streak} consecutive bad steps ({from_step - first_bad + 1} "
                f"since step {first_bad}) and no checkpoint from before step {first_bad} to "
                "roll back to; lower optim.lr, check the data, or save more often "
                "(checkpoint.every)"
            )
        consumed = self.sampler.consumed_samples
        self._load(tag)
        self.sampler.load_state_dict({"consumed_samples": consumed})
        self.lr_scale *= self.cfg.train.rollback_lr_scale
        self.rollbacks += 1
        ds_engine.set_lr_scale(self.engine, self.base_lrs, self.lr_scale)
        self.guard.bad_streak, self.guard.streak_start = 0, None
        log.log(
            {
                "step": self.step,
                "event": "rollback",
                "from_step": from_step,
                "to_tag": tag,
                "consumed_samples": consumed,
                "lr_scale": self.lr_scale,
            }
        )
        log.print(
            f"rollback: {self.cfg.train.max_bad_steps} bad steps in a row at step {from_step}; "
            f"restored {tag}, continuing past the bad data with lr x{self.lr_scale:g}"
        )

    def client_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed_s,
            "best_val_loss": self.best_val_loss,
            "sampler": self.sampler.state_dict(),
            "config": to_dict(self.cfg),
            "ds_config": self.ds,
            "n_params": self.n_params,
            "versions": ds_engine.versions(),
            "world_size": self.world,
            "data_fingerprint": self.data_fingerprint,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "bad_steps": self.guard.total_bad,
            "early_stopping": self.early.state_dict(),
        }

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        t, c = self.cfg.train, self.cfg.checkpoint
        log = RunLogger(
            self.run_dir,
            dist.is_rank0(),
            t.max_steps,
            self.step,
            log_cfg=self.cfg.log,
            log_every=t.log_every,
            warmup_steps=self.cfg.schedule.warmup_steps,
            config=to_dict(self.cfg),
        )
        if self.early.stopped:
            log.print(
                f"run already complete: it stopped early at step {self.step} "
                f"({self.early.reason}); pass eval.patience=0 to train on anyway"
            )
        elif self.step >= t.max_steps:
            log.print(f"run already complete at step {self.step} (raise train.max_steps to go on)")
        log.info(
            f"model {self.n_params / 1e6:.2f}M params ({self.n_trainable / 1e6:.2f}M trained) | "
            f"{self.world} rank(s) on "
            f"{self.device.type} | ZeRO-{ds_engine.zero_stage(self.ds)} "
            f"{ds_engine.precision(self.ds)} | global batch {self.global_batch} x "
            f"{t.seq_len} tokens"
        )
        last_row: dict[str, Any] = {}
        stop = StopSignal()
        self.watchdog = Watchdog(t.watchdog_s, self.rank)
        try:
            end = min(t.max_steps, t.stop_at or t.max_steps)
            while self.step < end and not self.early.stopped:
                row = self.train_step(stop.received)
                stopping = row.pop("stop")
                event = row.pop("event")
                if event is not None:
                    log.log(
                        {
                            "step": self.step,
                            "event": event,
                            "value": row["loss"],
                            "skipped": row["skipped"],
                            "bad_streak": self.guard.bad_streak,
                        }
                    )
                if self.guard.bad_streak >= t.max_bad_steps and not stopping:
                    log.log(row)
                    self._rollback(log)
                    continue
                last = self.step == t.max_steps
                if self.val_data is not None and (
                    last or (self.cfg.eval.every and self.step % self.cfg.eval.every == 0)
                ):
                    row.update(self.evaluate(log))
                log.log(row)
                last_row = row
                if self.early.stopped:
                    self._stop_early(log)
                    break
                if stopping and not last:
                    self.save(checkpoint.step_tag(self.step))
                    log.print(
                        f"stop signal: saved step {self.step}, exiting with status "
                        f"{EXIT_REQUEUE} (run again to continue)"
                    )
                    log.log({"step": self.step, "event": "preempted"})
                    log.finish("preempted", checkpoint_tags(self.run_dir))
                    # No rank leaves before rank 0 has logged; from here a signal (srun
                    # ending the others once one task exits) finds the work saved.
                    barrier()
                    stop.saved = True
                    return {"step": self.step, "tokens": self.tokens, "preempted": True}
                if not last and (self.step == end or (c.every and self.step % c.every == 0)):
                    self.save(checkpoint.step_tag(self.step))
            if last_row and self.step == t.max_steps and not self.early.stopped:
                self.save("final")
            done = "max_steps" if self.step >= t.max_steps else "stop_at"
            reason = "early_stop" if self.early.stopped else done
            log.finish(reason, checkpoint_tags(self.run_dir), self.early.reason)
        finally:
            self.watchdog.stop()
            stop.restore()
            log.close()
        return {
            "step": self.step,
            "tokens": self.tokens,
            "best_val_loss": self.best_val_loss,
            **{k: last_row.get(k) for k in ("loss", "val_loss")},
        }

    def _stop_early(self, log: RunLogger) -> None:
        """Every rank got here at the same eval (the val loss is all-reduced)."""
        self.save("final")  # `best` already holds the best weights
        log.log({"step": self.step, "event": "early_stop", "reason": self.early.reason})
        log.print(f"early stop at step {self.step}: {self.early.reason}; saved `final`")

    def train_step(self, stop_requested: bool = False) -> dict[str, Any]:
        t = self.cfg.train
        start = time.perf_counter()
        step = self.step + 1
        self._beat("step")
        faults.maybe_hang(step, self.rank)
        lr = self.engine.get_lr()[0]  # the LR this update will use
        indices = self.sampler.next_indices()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for k in range(t.grad_accum):
            x, y = self.train_data.inputs_and_labels(
                indices[k * t.micro_batch_size : (k + 1) * t.micro_batch_size]
            )
            loss = self.engine(x.to(self.device), labels=y.to(self.device))
            if (factor := faults.loss_factor(step, self.rank)) != 1.0:
                loss = loss * factor
            loss_sum += loss.detach().double()
            if k == t.grad_accum - 1:
                # Decide before the last backward, from the all-reduced loss, so every rank
                # agrees; a skip poisons the last gradient and DeepSpeed's overflow path
                # discards the whole update (see dsfm/faults.py).
                loss_mean, stop = reduce_step(loss_sum / t.grad_accum, stop_requested)
                verdict = self.guard.judge(loss_mean)
                if verdict.skip and math.isfinite(loss_mean):
                    loss = loss * math.nan
            self.engine.backward(loss)
            if k == 0:
                faults.maybe_kill(step, self.rank, "step")
            stage0_norm = None
            if k == t.grad_accum - 1:
                stage0_norm = ds_engine.grad_norm_before_step(self.engine)
            ds_engine.step(self.engine, stage0_norm)
        # fp16 loss-scale overflows are DeepSpeed's routine, not bad steps
        applied = self.engine.was_step_applied() or ds_engine.precision(self.ds) == "fp16"
        event = verdict.event or (None if applied else "nonfinite_grad")
        skipped = verdict.skip or not applied
        self.guard.record(step, loss_mean, not skipped, spike=verdict.event == "spike")
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = stage0_norm if grad_norm is None else grad_norm
        self.step += 1
        self.tokens += self.global_batch * t.seq_len
        dt = time.perf_counter() - start
        self.elapsed_s += dt
        tok_per_s = self.global_batch * t.seq_len / dt
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss_mean,
            "lr": lr,
            "grad_norm": finite_or_none(float(grad_norm)) if grad_norm is not None else None,
            "tok_per_s": tok_per_s,
            "mfu": mfu(tok_per_s, self.flops_per_token, self.world, self.peak),
            "elapsed_s": self.elapsed_s,
            **self.epoch_fields(),
            "skipped": skipped,
            "stop": stop,
            "event": event,
        }

    def epoch_fields(self) -> dict[str, Any]:
        """`epoch` (whole epochs begun) for one dataset; fractional `epochs` per blend source."""
        if isinstance(self.train_data, BlendedDataset):
            return {"epochs": self.train_data.epochs(self.sampler.consumed_samples)}
        return {"epoch": self.sampler.epoch}

    def _beat(self, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(self.step, phase)

    def evaluate(self, log: RunLogger) -> dict[str, Any]:
        e = self.cfg.eval
        self._beat("eval")
        self.engine.eval()
        n_samples = e.batches * self.cfg.train.micro_batch_size * self.world
        micro = self.cfg.train.micro_batch_size
        if isinstance(self.val_data, BlendedDataset):
            result = evaluate.blend_summary(
                self.engine, self.val_data, n_samples, micro, self.rank, self.world, self.device
            )
        else:
            indices = evaluate.eval_indices(self.val_data, n_samples, self.rank, self.world)
            loss = evaluate.mean_loss(self.engine, self.val_data, indices, micro, self.device)
            result = evaluate.summary(loss)
        loss = result["val_loss"]
        chat = "chat_template" in self.train_data.meta
        # Every rank generates: ZeRO-3 forwards are collective.
        for i, prompt in enumerate(e.prompts):
            ids, stop_id = prompt_ids(self.tokenizer, prompt, chat=chat)
            new = sample(
                self.engine.module,
                ids,
                max_new_tokens=e.max_new_tokens,
                temperature=e.temperature,
                top_k=e.top_k,
                seed=self.cfg.train.seed + i,
                eot_id=stop_id,
            )
            log.sample(
                {"step": self.step, "prompt": prompt, "completion": self.tokenizer.decode(new)}
            )
        self.engine.train()
        self.early.update(loss, self.step)
        if loss < self.best_val_loss:
            self.best_val_loss = loss
            if self.cfg.checkpoint.save_best:
                self.save("best", update_latest=False)
        return result

    def save(self, tag: str, update_latest: bool = True) -> None:
        self._beat(f"save {tag}")
        checkpoint.save(
            self.engine,
            self.ckpt_dir,
            tag,
            self.client_state(),
            tokenizer_path=self.tokenizer_path,
            update_latest=update_latest,
        )
        barrier()
        if dist.is_rank0():
            checkpoint.prune(self.ckpt_dir, self.cfg.checkpoint.keep_last)
        barrier()


def open_data(
    cfg: Config, split: str, warn: Callable[[str], None] | None = None
) -> TokenDataset | BlendedDataset:
    """`data.path`'s split, or the blend of `data.mix`'s (shuffled per source for training;
    validation takes each source's first samples, the same every eval)."""
    if not cfg.data.mix:
        return TokenDataset(cfg.data.path, split, cfg.train.seq_len)
    seed = cfg.train.seed if split == "train" else None
    return open_split(cfg.data.sources(), split, cfg.train.seq_len, seed, warn)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def reduce_step(loss: torch.Tensor, stop_requested: bool) -> tuple[float, bool]:
    """Mean loss over ranks and whether any rank was asked to stop, in one all-reduce."""
    x = torch.stack(
        [
            loss.double(),
            torch.tensor(float(stop_requested), dtype=torch.float64, device=loss.device),
        ]
    )
    world = 1
    if torch_dist.is_available() and torch_dist.is_initialized():
        world = torch_dist.get_world_size()
        torch_dist.all_reduce(x)
    return x[0].item() / world, x[1].item() > 0


class StopSignal:
    """SIGUSR1/SIGTERM ask for a checkpoint and a clean exit; a second one exits at once,
    with EXIT_REQUEUE when the checkpoint is already saved (srun terminates the remaining
    tasks as soon as one exits), else EXIT_ABORTED."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = False
        self.saved = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers need the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:
            os._exit(EXIT_REQUEUE if self.saved else EXIT_ABORTED)
        self.received = True
        dist.print0(f"received {signal.Signals(signum).name}: stopping after this step")

    def restore(self) -> None:
        if self.saved:  # keep exiting 75 on a late signal until the process ends
            return
        for s, handler in self.previous.items():
            signal.signal(s, handler)
