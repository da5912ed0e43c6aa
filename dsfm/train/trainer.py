"""The training loop: build the parts, then step, validate, checkpoint and log until done.

`launchers/pretrain.py` under `deepspeed`, `dsfm train` and `dsfm finetune` all call `run()`.
This module only orchestrates; each part owns its decisions: the configs are resolved by
`dsfm.config.resolve`, the model and data built by `build.py`, the engine is `engine.py`'s,
`Checkpointer.due` and `Validator.due` say when to save and when to validate, `LossGuard`
which steps are bad and when a rollback is due, `EarlyStopping` when to stop, `StopSignal`
and `Watchdog` how a run stops otherwise, and `RunLogger` where the rows go.

One step (`train_step`): the next global batch's slice for this rank, forward and backward
per micro-batch, and one all-reduce of the loss before the last backward, which also
carries every rank's stop request (a signal seen by one rank stops all of them) and lets
every rank judge the step alike: a bad step back-propagates a NaN loss and DeepSpeed's own
overflow path discards the update on every rank (`guard.py`). The GPU never waits for the
host within a step: the judgement is made on the device, and the step's numbers (loss,
stop request, verdict, gradient norm) are read back in one transfer after its kernels are
queued (`_read_once`; tests/unit/train/test_hot_loop.py counts the reads).

Exact resume: the whole training state is the engine's (weights, ZeRO optimizer shards),
the sampler's `consumed_samples`, per-rank RNG states and the counters of the client state.
The LR of each update is `schedule.lr_at` of the step counter (times the rollbacks' scale),
set by the trainer, so it comes back with the counters. Validation and sampling never touch
the global RNG. `train.resume_from` picks the tag to resume from (here or in another run).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsfm.config.deepspeed import precision, zero_stage
from dsfm.config.load import find_recipe, load_config, to_dict
from dsfm.config.resolve import resolve_configs
from dsfm.config.schema import Config, ConfigError
from dsfm.data.blend import BlendedDataset
from dsfm.data.dataset import doc_positions
from dsfm.data.format import fingerprint
from dsfm.data.sampler import Sampler
from dsfm.data.tokenizer import Tokenizer, copy_tokenizer, tokenizer_file
from dsfm.distributed.collectives import (
    barrier,
    first_of_ranks,
    from_rank0,
    lost_peer,
    mean_and_any,
)
from dsfm.distributed.env import (
    describe,
    ensure_env,
    is_rank0,
    local_rank,
    print0,
    rank,
    world_size,
)
from dsfm.doctor import preflight
from dsfm.eval.loss import perplexity
from dsfm.gpus import peak_flops
from dsfm.observe import rundir
from dsfm.observe.metrics import RunLogger, mfu, uniform_baseline
from dsfm.observe.monitor import EarlyStopping
from dsfm.observe.numbers import finite_or_none
from dsfm.testing import faults
from dsfm.train import build, checkpoint, runlock
from dsfm.train import engine as ds_engine
from dsfm.train.checkpoint import CheckpointError
from dsfm.train.checkpointer import Checkpointer
from dsfm.train.guard import LossGuard
from dsfm.train.schedule import lr_at
from dsfm.train.stop import EXIT_REQUEUE, PeerLost, StopSignal, Watchdog
from dsfm.train.validation import Validator


@dataclass
class Counters:
    """The trainer's own state beside the engine's and the sampler's (in the client state)."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0  # in train steps only (not eval or saving)
    best_val_loss: float = math.inf
    lr_scale: float = 1.0  # product of the rollbacks' train.rollback_lr_scale
    rollbacks: int = 0

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Counters:
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})


@dataclass
class StepResult:
    row: dict[str, Any]  # the metrics row
    event: str | None  # "nonfinite", "spike", "nonfinite_grad" or None
    stop: bool  # some rank was asked to stop (all ranks agree)


class Trainer:
    def __init__(self, cfg: Config, ds: dict[str, Any]):
        self.cfg, self.ds = cfg, ds
        t = cfg.train
        self.rank, self.world = rank(), world_size()
        self.run_dir = Path(t.out_dir)
        self.ckpt_dir = rundir.checkpoints_dir(self.run_dir)
        self.device = ds_engine.device()
        self.global_batch = t.micro_batch_size * t.grad_accum * self.world

        self._check_data()
        self.train_data = build.open_data(cfg, "train")
        val_data = build.open_val(cfg, self.world, warn=lambda m: print0(f"warning: {m}"))
        self.tokenizer_path = tokenizer_file(cfg.data.sources()[0][1])
        self.tokenizer = Tokenizer.load(self.tokenizer_path)
        self.data_fingerprint = fingerprint(cfg.data.sources())
        self.resumed_from: str | None = None  # train.resume_from's tag, once resumed from
        resume_point = self._resume_point()

        build.seed_everything(t.seed)  # same init on every rank
        model = build.build_model(cfg, ds)
        self.flops_per_token = model.flops_per_token(t.seq_len)
        self.n_params = ds_engine.count_params(model)
        self.n_trainable = ds_engine.count_params(model, trainable=True)
        self.engine = ds_engine.initialize(model, ds, cfg.optim.weight_decay, compile=t.compile)
        build.seed_everything(t.seed + 1000 * self.rank)  # dropout streams differ per rank

        # A blend orders its own samples (per-source shuffles); the sampler only counts.
        self.sampler = Sampler(
            len(self.train_data),
            self.global_batch,
            self.rank,
            self.world,
            seed=t.seed,
            shuffle=not isinstance(self.train_data, BlendedDataset),
        )
        self.checkpointer = Checkpointer(
            self.engine, self.ckpt_dir, cfg.checkpoint, self.tokenizer_path
        )
        self.validator = Validator(
            cfg.eval,
            val_data,
            self.tokenizer,
            chat="chat_template" in self.train_data.meta,
            micro_batch_size=t.micro_batch_size,
            rank=self.rank,
            world=self.world,
            device=self.device,
            seed=t.seed,
            doc_mask=bool(cfg.model.doc_mask),
        )
        self.counters = Counters()
        self.early = EarlyStopping(cfg.eval.patience, cfg.eval.min_delta)
        self.guard = LossGuard(t.spike_sigma, t.spike_skip, max_bad_steps=t.max_bad_steps)
        self.peak = (
            peak_flops(torch.cuda.get_device_name(self.device))
            if self.device.type == "cuda"
            else None
        )
        self.watchdog: Watchdog | None = None

        if is_rank0():
            rundir.write_configs(self.run_dir, to_dict(cfg), ds)
            copy_tokenizer(self.tokenizer_path, self.run_dir)
        barrier()
        if resume_point is not None:
            self._resume(*resume_point)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        log = self._open_log()
        end = min(t.max_steps, t.stop_at or t.max_steps)
        stop = StopSignal()
        self.watchdog = Watchdog(t.watchdog_s, self.rank)
        last_row: dict[str, Any] = {}
        try:
            while self.counters.step < end and not self.early.stopped:
                passes = self.sampler.epoch
                result = self.train_step(stop.received)
                if result.event is not None:
                    log.log(self._event_row(result))
                if self.guard.rollback_due and not result.stop:
                    log.log(result.row)
                    self._rollback(log)
                    continue
                step, last = self.counters.step, self.counters.step == t.max_steps
                if self.validator.due(step, last):
                    result.row.update(self._validate(log))
                    self._judge(result.row["val_loss"])
                log.log(result.row)
                last_row = result.row
                if self.checkpointer.epoch_due(passes, self.sampler.epoch):
                    self._save(checkpoint.epoch_tag(self.sampler.epoch))
                if self.early.stopped:
                    self._stop_early(log)
                    break
                if result.stop and not last:
                    return self._preempt(log, stop)
                if not last and self.checkpointer.due(step, end):
                    self._save(checkpoint.step_tag(step))
            self._finish(log, trained=bool(last_row))
        except Exception as e:  # a dead peer: one line naming rank and phase, not gloo's trace
            if (cause := lost_peer(e)) is None:
                raise
            tag = checkpoint.resumable_tag(self.ckpt_dir, warn=False)
            w = self.watchdog
            raise PeerLost(self.rank, w.phase, w.step, cause, tag) from None
        finally:
            self.watchdog.stop()
            stop.restore()
            log.close()
        return {
            "step": self.counters.step,
            "tokens": self.counters.tokens,
            "best_val_loss": self.counters.best_val_loss,
            **{k: last_row.get(k) for k in ("loss", "val_loss")},
        }

    def train_step(self, stop_requested: bool = False) -> StepResult:
        """One optimizer step. The device is read once, after the step's kernels are queued:
        the decision to skip a bad step is taken on the device from the all-reduced loss
        (every rank decides alike), and the loss, stop request, verdict and gradient norm
        come back together in one transfer (`_read_once`)."""
        t = self.cfg.train
        start = time.perf_counter()
        step = self.counters.step + 1
        if self.device.type == "cuda":  # mem_gb is this step's peak, not the run's
            torch.cuda.reset_peak_memory_stats(self.device)
        self._beat("step")
        faults.at_step_start(step, self.rank)
        lr = self.lr()
        ds_engine.set_lr(self.engine, lr)
        indices = self.sampler.next_indices()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for k in range(t.grad_accum):
            x, y = self.train_data.inputs_and_labels(
                indices[k * t.micro_batch_size : (k + 1) * t.micro_batch_size]
            )
            positions = (  # per-document positions when training document-masked
                doc_positions(x, self.train_data.eot_id).to(self.device)
                if self.cfg.model.doc_mask
                else None
            )
            loss = self.engine(x.to(self.device), labels=y.to(self.device), positions=positions)
            if (factor := faults.loss_factor(step, self.rank)) != 1.0:
                loss = loss * factor
            loss_sum += loss.detach().double()
            if k == t.grad_accum - 1:
                # Before the last backward: a skip poisons the last gradient and DeepSpeed's
                # overflow path discards the whole update on every rank (see guard.py).
                loss_mean, stop = mean_and_any(loss_sum / t.grad_accum, stop_requested)
                skip, spike = self.guard.judge_on_device(loss_mean)
                loss = loss * torch.where(skip, math.nan, 1.0)
            self.engine.backward(loss)
            if k == 0:
                faults.maybe_kill(step, self.rank, "step")
            stage0_norm = None
            if k == t.grad_accum - 1:
                stage0_norm = ds_engine.grad_norm_before_step(self.engine)
            ds_engine.step(self.engine, stage0_norm)
        norm = self.engine.get_global_grad_norm()
        norm = stage0_norm if norm is None else norm
        loss_mean, stop, skip, spike, norm = _read_once(loss_mean, stop, skip, spike, norm)
        applied = self.engine.was_step_applied()
        if stage0_norm is not None and ds_engine.skips_on_device(self.engine) and skip_norm(norm):
            ds_engine.count_skipped(self.engine)  # skipped on the device, unseen by DeepSpeed
            applied = False
        # fp16 loss-scale overflows are DeepSpeed's routine, not bad steps
        applied = applied or precision(self.ds) == "fp16"
        event = "nonfinite" if not math.isfinite(loss_mean) else ("spike" if spike else None)
        event = event or (None if applied else "nonfinite_grad")
        skipped = skip or not applied
        self.guard.record(step, loss_mean, not skipped, spike=spike)
        c = self.counters
        c.step += 1
        c.tokens += self.global_batch * t.seq_len
        dt = time.perf_counter() - start
        c.elapsed_s += dt
        tok_per_s = self.global_batch * t.seq_len / dt
        row = {
            "step": c.step,
            "tokens": c.tokens,
            "loss": loss_mean,
            "ppl": perplexity(loss_mean),
            "lr": lr,
            "grad_norm": finite_or_none(norm),
            "tok_per_s": tok_per_s,
            "mfu": mfu(tok_per_s, self.flops_per_token, self.world, self.peak),
            "elapsed_s": c.elapsed_s,
            **self._epoch_fields(),
            "skipped": skipped,
        }
        if self.device.type == "cuda":  # GiB, as dsfm plan and dsfm.gpus count memory
            row["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return StepResult(row, event, stop)

    def lr(self) -> float:
        """The next update's LR: the schedule at the step counter, times the rollbacks'
        scale. Both come back with a checkpoint, so a resumed run's LRs are the same."""
        return self.counters.lr_scale * lr_at(
            self.counters.step, self.cfg.schedule, self.cfg.optim.lr, self.cfg.train.max_steps
        )

    # ------------------------------------------------------------------ what the loop calls

    def _open_log(self) -> RunLogger:
        t = self.cfg.train
        log = RunLogger(
            self.run_dir,
            is_rank0(),
            t.max_steps,
            self.counters.step,
            log_cfg=self.cfg.log,
            log_every=t.log_every,
            warmup_steps=self.cfg.schedule.warmup_steps,
            config=to_dict(self.cfg),
        )
        if self.early.stopped:
            log.print(
                f"run already complete: it stopped early at step {self.counters.step} "
                f"({self.early.reason}); pass eval.patience=0 to train on anyway"
            )
        elif self.counters.step >= t.max_steps:
            log.print(
                f"run already complete at step {self.counters.step} "
                "(raise train.max_steps to go on)"
            )
        log.info(
            f"model {self.n_params / 1e6:.2f}M params ({self.n_trainable / 1e6:.2f}M trained) | "
            f"{self.world} rank(s) on {self.device.type} | ZeRO-{zero_stage(self.ds)} "
            f"{precision(self.ds)} | global batch {self.global_batch} x {t.seq_len} tokens"
        )
        log.info(uniform_baseline(self.cfg.model.vocab_size))
        if t.epochs is not None:
            log.print(
                f"train.epochs={t.epochs}: {len(self.train_data)} samples per pass / global batch "
                f"{self.global_batch} -> train.max_steps={t.max_steps}"
            )
        return log

    def _event_row(self, result: StepResult) -> dict[str, Any]:
        return {
            "step": self.counters.step,
            "event": result.event,
            "value": result.row["loss"],
            "skipped": result.row["skipped"],
            "bad_streak": self.guard.bad_streak,
        }

    def _validate(self, log: RunLogger) -> dict[str, Any]:
        """Val metrics for the row; the samples go to samples.jsonl."""
        self._beat("eval")
        self.engine.eval()
        metrics = self.validator.loss(self.engine)
        for row in self.validator.samples(self.engine.module, self.counters.step):
            log.sample(row)
        self.engine.train()
        return metrics

    def _judge(self, val_loss: float) -> None:
        """Early stopping counts the eval; a new best val loss is saved as `best`."""
        self.early.update(val_loss, self.counters.step)
        if val_loss < self.counters.best_val_loss:
            self.counters.best_val_loss = val_loss
            if self.cfg.checkpoint.save_best:
                self._save("best", update_latest=False)

    def _rollback(self, log: RunLogger) -> None:
        """After max_bad_steps skipped steps in a row: back to the newest checkpoint from
        before the streak, keeping the data position so the offending batches are not seen
        again (and lowering the LR if train.rollback_lr_scale < 1)."""
        first_bad, from_step = self.guard.streak_start, self.counters.step
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
        c = self.counters
        c.lr_scale *= self.cfg.train.rollback_lr_scale
        c.rollbacks += 1
        self.guard.end_streak()
        log.log(
            {
                "step": c.step,
                "event": "rollback",
                "from_step": from_step,
                "to_tag": tag,
                "consumed_samples": consumed,
                "lr_scale": c.lr_scale,
            }
        )
        log.print(
            f"rollback: {self.cfg.train.max_bad_steps} bad steps in a row at step {from_step}; "
            f"restored {tag}, continuing past the bad data with lr x{c.lr_scale:g}"
        )

    def _stop_early(self, log: RunLogger) -> None:
        """Every rank got here at the same eval (the val loss is all-reduced)."""
        self._save("final")  # `best` already holds the best weights
        log.log({"step": self.counters.step, "event": "early_stop", "reason": self.early.reason})
        log.print(f"early stop at step {self.counters.step}: {self.early.reason}; saved `final`")

    def _preempt(self, log: RunLogger, stop: StopSignal) -> dict[str, Any]:
        step = self.counters.step
        self._save(checkpoint.step_tag(step))
        log.print(
            f"stop signal: saved step {step}, exiting with status {EXIT_REQUEUE} "
            "(run again to continue)"
        )
        log.log({"step": step, "event": "preempted"})
        log.finish("preempted", checkpoint.published_tags(self.ckpt_dir))
        # No rank leaves before rank 0 has logged; from here a signal (srun ending the
        # others once one task exits) finds the work saved.
        barrier()
        stop.saved = True
        return {"step": step, "tokens": self.counters.tokens, "preempted": True}

    def _finish(self, log: RunLogger, trained: bool) -> None:
        t = self.cfg.train
        if trained and self.counters.step == t.max_steps and not self.early.stopped:
            self._save("final")
        done = "max_steps" if self.counters.step >= t.max_steps else "stop_at"
        reason = "early_stop" if self.early.stopped else done
        log.finish(reason, checkpoint.published_tags(self.ckpt_dir), self.early.reason)

    # ------------------------------------------------------------------ state

    def client_state(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.counters),
            "sampler": self.sampler.state_dict(),
            "config": to_dict(self.cfg),
            "ds_config": self.ds,
            "n_params": self.n_params,
            "versions": ds_engine.versions(),
            "world_size": self.world,
            "data_fingerprint": self.data_fingerprint,
            "bad_steps": self.guard.total_bad,
            "early_stopping": self.early.state_dict(),
            "resumed_from": self.resumed_from,
        }

    def _check_data(self) -> None:
        """The token files against their hashes, once per node (the first start of a dataset
        reads it, later ones only stat it); a damaged file ends every rank with its name."""
        problem = None
        if local_rank() == 0:
            try:
                build.check_data(self.cfg, say=print)
            except (ValueError, OSError) as e:  # a missing file too: no rank may wait alone
                problem = str(e)
        if problem := first_of_ranks(problem):
            raise ValueError(problem)

    def _resume_point(self) -> tuple[Path, str] | None:
        """(checkpoints dir, tag) to resume from, checked against the config before anything
        is built: this run's newest complete tag, or train.resume_from's tag unless this run
        has already continued from it (a requeued job goes on from its own checkpoints)."""
        if is_rank0():  # what a killed save left behind, before anyone reads the dir
            checkpoint.clean_stale(self.ckpt_dir)
        barrier()
        own = checkpoint.resumable_tag(self.ckpt_dir)
        point = None if own is None else (self.ckpt_dir, own)
        if name := self.cfg.train.resume_from:
            source = checkpoint.locate(self.cfg.train.out_dir, name)
            origin = f"{(source[0] / source[1]).resolve()}@step" + str(
                checkpoint.client_state(*source)["step"]
            )
            if (
                own is not None
                and checkpoint.client_state(self.ckpt_dir, own).get("resumed_from") == origin
            ):
                print0(f"train.resume_from={name}: already continued from it; going on from {own}")
            else:
                point, self.resumed_from = source, origin
        if point is not None:  # a mismatched checkpoint is refused before building anything
            saved = checkpoint.client_state(*point)
            checkpoint.check_resume_compatible(
                saved, self.cfg, point[0] / point[1], self.data_fingerprint
            )
            old_len = saved["config"]["train"]["seq_len"]
            if old_len != self.cfg.train.seq_len:  # allowed (curricula do it), but said
                print0(
                    f"note: train.seq_len={self.cfg.train.seq_len} but {point[1]} trained with "
                    f"{old_len}: the samples are new windows in a new order, so the data does "
                    "not continue exactly where it stopped"
                )
        return point

    def _resume(self, ckpt_dir: Path, tag: str) -> None:
        state = self._load(tag, ckpt_dir)
        self.sampler.load_state_dict(state["sampler"])
        self.guard.total_bad = state["bad_steps"]
        # carried in every later tag, so a requeued job knows it has resumed from it
        self.resumed_from = self.resumed_from or state.get("resumed_from")
        print0(f"resumed from {ckpt_dir / tag} at step {self.counters.step}")

    def _load(self, tag: str, ckpt_dir: Path | None = None) -> dict[str, Any]:
        """Engine state and counters of `tag` (the sampler is the caller's choice)."""
        state = self.checkpointer.load(tag, ckpt_dir)
        self.counters = Counters.from_state(state)
        self.early.load_state_dict(state["early_stopping"])
        return state

    def _save(self, tag: str, update_latest: bool = True) -> None:
        self._beat(f"save {tag}")
        self.checkpointer.save(tag, self.client_state(), update_latest)

    def _epoch_fields(self) -> dict[str, Any]:
        """`epoch` (whole epochs begun) for one dataset; fractional `epochs` per blend source."""
        if isinstance(self.train_data, BlendedDataset):
            return {"epochs": self.train_data.epochs(self.sampler.consumed_samples)}
        return {"epoch": self.sampler.epoch}

    def _beat(self, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(self.counters.step, phase)


def _read_once(
    loss: torch.Tensor,
    stop: torch.Tensor,
    skip: torch.Tensor,
    spike: torch.Tensor,
    norm: torch.Tensor | float | None,
) -> tuple[float, bool, bool, bool, float | None]:
    """The step's one device-to-host transfer: its numbers stacked into one tensor."""
    values = [loss.double(), stop.double(), skip.double(), spike.double()]
    if torch.is_tensor(norm):
        values.append(norm.detach().double().to(loss.device))
    read = torch.stack(values).tolist()
    if not torch.is_tensor(norm):
        read.append(norm)
    return read[0], read[1] > 0, read[2] > 0, read[3] > 0, read[4]


def skip_norm(norm: float | None) -> bool:
    return norm is not None and not math.isfinite(norm)


# ---------------------------------------------------------------------- entry points


def run(
    config_path: str | None,
    ds_path: str,
    overrides: list[str],
    data: str | None = None,
    default_corpus: bool = False,
) -> dict[str, Any]:
    """Resolve both configs (every problem at once), then train. Returns the final summary
    (on every rank). `data` (`--data`): a prepared dataset, or raw text to prepare first;
    `default_corpus`: a config naming no data trains on the embedded corpus (pretraining)."""
    launch = ensure_env()
    if data or default_corpus:
        overrides = [*overrides, *build.data_overrides(config_path, overrides, data)]
    cfg, ds = resolve_configs(config_path, ds_path, overrides, world_size())
    # Stop before building anything if this machine cannot run the DeepSpeed config.
    if problems := preflight(ds, ds_engine.accelerator_name()):
        raise ConfigError(problems)
    print0(describe(launch))
    # The watchdog names the stuck rank; the backend timeout, later, is the backstop.
    ds_engine.init_distributed(2 * cfg.train.watchdog_s)
    lock = lock_run_dir(Path(cfg.train.out_dir))
    try:
        return Trainer(cfg, ds).fit()
    finally:
        if lock is not None:
            lock.release()


def lock_run_dir(run_dir: Path) -> runlock.RunLock | None:
    """Rank 0 takes the run directory's one-writer lock before anything reads or cleans it;
    a refusal ends every rank alike, before the engine is built (None on other ranks)."""
    lock, refusal = None, None
    if is_rank0():
        try:
            lock = runlock.acquire(run_dir, say=print0)
        except runlock.RunLocked as e:
            refusal = str(e)
        except OSError as e:  # e.g. a read-only train.out_dir: every rank must hear of it
            refusal = f"cannot lock {run_dir} ({e}); train.out_dir must be writable"
    if refusal := from_rank0(refusal):
        raise runlock.RunLocked(refusal)
    return lock


def train_command(
    config: str | None,
    ds: str,
    overrides: list[str],
    data: str | None = None,
    trust_checkpoint: bool = False,
) -> int:
    checkpoint.trust_pickles(trust_checkpoint)
    return _train(config, ds, overrides, data, default_corpus=True)


def _train(
    config: str | None, ds: str, overrides: list[str], data: str | None, default_corpus: bool
) -> int:
    try:
        summary = run(
            find_recipe(config, "configs") if config else None,
            find_recipe(ds, "ds_configs"),
            overrides,
            data,
            default_corpus,
        )
    # e.g. disk full, a node lost: the message says what is intact and what to do
    except (CheckpointError, PeerLost) as e:
        if is_rank0() or not getattr(e, "agreed", False):  # an agreed failure: rank 0 says it
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return EXIT_REQUEUE if summary.get("preempted") else 0


def finetune_command(
    config: str | None, ds: str, overrides: list[str], trust_checkpoint: bool = False
) -> int:
    checkpoint.trust_pickles(trust_checkpoint)
    cfg = load_config(find_recipe(config, "configs") if config else None, overrides)
    if not cfg.train.init_from:
        raise ValueError(
            "finetune needs train.init_from=RUN_OR_CHECKPOINT (the model to start "
            "from: a pretraining run, a tag, or a `dsfm import` output)"
        )
    return _train(config, ds, overrides, None, default_corpus=False)  # SFT data is never implied
