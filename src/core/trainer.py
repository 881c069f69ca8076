"""The training loop: steps, accumulation, precision, clipping, the non-finite guard, evaluation,
callbacks, loggers and checkpoints. ``train_step`` is the one override point.

The hot path keeps metrics as device tensors and syncs with the host once per optimizer step (the
non-finite guard must decide whether to apply the update) and once per log interval.
"""

from __future__ import annotations

import contextlib
import signal
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

import torch

from src.core.audit import SampleAudit
from src.core.config import TrainerConfig
from src.core.interval import IntervalMetrics, batch_size_of
from src.core.seeding import rng_state, set_rng_state
from src.core.signals import deferred_signals
from src.core.spikes import SpikeGuard

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# The trainer's checkpointed state, one key each (Trainer.state_dict / load_state_dict).
STEP, EPOCH, BATCH_IN_EPOCH, BATCH_USES = "step", "epoch", "batch_in_epoch", "batch_uses"
SCHEDULER, SCALER, TASK, INTERVAL, LAST_VAL = "scheduler", "scaler", "task", "interval", "last_val"
CALLBACKS, CALLBACK_TYPES = "callbacks", "callback_types"
BAD_STEPS, TOTAL_BAD_STEPS, SPIKES = "bad_steps", "total_bad_steps", "loss_spikes"
# ... and each rank's own (rank_state_dict / load_rank_state_dict).
RNG = "rng"


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good state was checkpointed."""


class Trainer:
    """Runs a task under a strategy until ``max_steps`` optimizer steps (or a stop).

    Args:
        cfg: the ``trainer`` config section.
        task: the (unwrapped) Task; ``model`` is what the strategy wrapped it into.
        max_steps: total optimizer steps (derived from max_steps / max_epochs).
        checkpoints: a CheckpointManager, or None for no checkpoints.
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        *,
        task,
        model,
        strategy,
        optimizer,
        scheduler,
        train_loader,
        val_loader,
        max_steps: int,
        callbacks: Iterable = (),
        loggers: Iterable = (),
        checkpoints=None,
        run_dir: Optional[Path] = None,
        run_info: Optional[dict] = None,
        on_start: Optional[Callable[[], None]] = None,
        group_lrs: Iterable[tuple[str, int]] = (),
        audit_dir: Optional[Path] = None,
    ):
        self.cfg, self.task, self.model, self.strategy = cfg, task, model, strategy
        self.group_lrs = list(group_lrs)  # (metric name, index in optimizer.param_groups)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.max_steps, self.callbacks, self.loggers = max_steps, list(callbacks), list(loggers)
        self.checkpoints = checkpoints
        self.run_dir, self.run_info, self.on_start = run_dir, run_info or {}, on_start
        self.batches_per_epoch = train_loader.batches_per_epoch()
        # optimizer steps each loader batch serves (GRPO's num_iterations, PPO's ppo_epochs):
        # the loader's place moves past a batch after its last one
        self.steps_per_batch = getattr(task, "steps_per_batch", 1)
        self.step = self.epoch = self.batch_in_epoch = self.batch_uses = 0
        self.bad_steps = self.total_bad_steps = 0
        self.should_stop = False
        self.last_val: dict[str, float] = {}
        self.last_logged: dict[str, float] = {}
        self._signal = self._pending_signal = 0
        self._last_eval = self._last_save = -1
        device = strategy.device
        own = strategy.owns_precision
        self.dtype = None if own else DTYPES[cfg.precision]
        self.scaler = (
            torch.amp.GradScaler(device.type) if cfg.precision == "fp16" and not own else None
        )
        from src.core.throughput import peak_flops

        self.peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(device, cfg.precision)
        self.flops_per_micro: Optional[int] = None  # measured once, on the first micro-batch
        self.interval = IntervalMetrics()
        self.spikes = (
            SpikeGuard(cfg.loss_spike_sigmas, cfg.loss_spike_window, device)
            if cfg.loss_spike_sigmas
            else None
        )
        self._micro: dict[str, torch.Tensor] = {}  # this step's scalars: the mean of its micros
        self._extras: dict[str, Any] = {}  # this step's other outputs: the last micro's
        self.audit = (  # data.audit: the sample ids of every step, per rank
            SampleAudit(audit_dir, strategy.rank, strategy.world_size) if audit_dir else None
        )

    # ------------------------------------------------------------------ public

    def fit(self) -> dict[str, float]:
        """Train (resuming first if a checkpoint is there); returns the last logged metrics."""
        resumed = self._resume()
        if self.audit is not None:
            self.audit.start(self.step, self.strategy.barrier)
        if self.on_start is not None:  # the run's record is written once the state has loaded
            self.on_start()
        if self.checkpoints is not None:
            self.checkpoints.clean_uncommitted()
        for lg in self.loggers:
            lg.start(self.run_info, resumed)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        status = "FAILED"
        try:
            with deferred_signals(self._on_signal):
                self._run()
            status = "KILLED" if self._signal else "FINISHED"
            if not self._signal and self.run_dir is not None and self.strategy.is_main:
                self._write_artifacts(self.run_dir)
        finally:
            if self.checkpoints is not None:
                self.checkpoints.wait()
            if self.audit is not None:
                self.audit.close()
            for cb in self.callbacks:
                cb.on_fit_end(self)
            for lg in self.loggers:
                lg.finish(status)
        if self._signal:
            if self.strategy.is_main:
                latest = self.checkpoints.latest() if self.checkpoints is not None else None
                saved = f"saved {latest}; " if latest is not None else ""
                print(
                    f"stopped by {signal.Signals(self._signal).name} at step {self.step}; "
                    f"{saved}run the same command again to resume",
                    flush=True,
                )
            raise SystemExit(128 + self._signal)
        return {**self.last_logged, **self.last_val}

    def _write_artifacts(self, run_dir: Path) -> None:
        """The task's figures and ``curves.png`` into the run folder, each given to the loggers
        (before they finish)."""
        from src.core.curves import write_curves

        self.task.write_artifacts(run_dir)
        write_curves(run_dir)
        images = {p.stem: p for p in sorted(run_dir.glob("*.png"))}
        for lg in self.loggers:
            lg.log_images(images, self.step)

    def train_step(self, batch: Any, final: bool, n_micro: int) -> dict[str, torch.Tensor]:
        """Forward and backward of one loader batch; the override point for custom steps.

        Args:
            final: the last loader batch of this optimizer step (gradients are synchronised).
            n_micro: loader batches in this step (the loss is divided by it).
        Returns:
            The task's outputs, detached. A task whose ``split`` cuts the batch into chunks has
            each chunk go forward and backward alone: ``loss`` is their sum, other scalars their
            mean, anything else the last chunk's.
        """
        if not self.task.splits_batches:
            return self._backward(batch, final, n_micro)
        parts = self.task.split(batch)
        out: dict[str, Any] = {}
        for j, part in enumerate(parts):
            got = self._backward(part, final and j == len(parts) - 1, n_micro)
            for k, v in got.items():
                if isinstance(v, torch.Tensor) and v.ndim == 0:
                    out[k] = out.get(k, 0) + (v if k == "loss" else v / len(parts))
                else:
                    out[k] = v
        return out

    def _backward(self, batch: Any, final: bool, n_micro: int) -> dict[str, torch.Tensor]:
        ctx = contextlib.nullcontext() if final else self.strategy.no_sync(self.model)
        with ctx:
            with self._autocast():
                out = self.model(batch)
            loss = out["loss"] / n_micro if n_micro > 1 else out["loss"]
            if self.scaler is not None:
                loss = self.scaler.scale(loss)
            self.strategy.backward(loss)
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Run the validation split; returns (and logs) ``val/...`` metrics averaged over samples."""
        if self.val_loader is None:
            return {}
        with self._off_the_clock():
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        for cb in self.callbacks:
            cb.on_validation_start(self)
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        n = 0
        zero = torch.zeros((), device=self.strategy.device)
        for batch, padding in self.val_loader:
            # Every rank runs as many steps (sharded models gather in each forward); a padding
            # batch keeps the ranks in step and counts zero in every metric.
            batch = self.strategy.to_device(batch)
            bs = 0 if padding else batch_size_of(batch)
            self.task.padding_batch = padding
            with self._autocast():
                out = self.model(batch, stage="val")
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.ndim == 0:  # same keys on every rank
                    sums[k] = sums.get(k, 0) + (zero if padding else v.detach().float() * bs)
            if padding:  # callbacks see zero rows, so their own gathers stay in step too
                out = {
                    k: v[:0] if isinstance(v, torch.Tensor) and v.ndim else v
                    for k, v in out.items()
                }
            for cb in self.callbacks:
                cb.on_validation_batch_end(self, out)
            n += bs
        self.task.padding_batch = False
        sums["_n"] = torch.tensor(float(n), device=self.strategy.device)
        totals = self.strategy.reduce(sums)
        count = totals.pop("_n")
        metrics = (
            {
                f"val/{k}": v
                for k, v in zip(totals, (torch.stack(list(totals.values())) / count).tolist())
            }
            if totals
            else {}
        )
        extra = self.task.validation_epoch_end(self.strategy.gather)
        metrics.update({f"val/{k}": float(v) for k, v in extra.items()})
        self.model.train()
        self.last_val = metrics
        self._last_eval = self.step
        for cb in self.callbacks:
            cb.on_validation_end(self, metrics)
        # the epoch of the last step: at an epoch's end the counter has already moved on
        step_epoch = self.epoch - 1 if self.batch_in_epoch == 0 and self.step else self.epoch
        self._emit({"epoch": step_epoch, **metrics})
        texts = self.task.validation_texts()
        if texts and self.strategy.is_main:
            for lg in self.loggers:
                lg.log_text(texts, self.step)
        return metrics

    def save(self) -> Optional[Path]:
        """Checkpoint the full state now (no-op without a CheckpointManager)."""
        if self.checkpoints is None or self._last_save == self.step:
            return None
        with self._off_the_clock():
            return self._save()

    def _save(self) -> Path:
        path = self.checkpoints.save(
            self.step,
            self.epoch,
            self.model,
            self.optimizer,
            self.state_dict(),
            self.rank_state_dict(),
            metrics=self.last_val,
            extra_files=self.task.write_checkpoint_files,
        )
        self._last_save = self.step
        return path

    def state_dict(self) -> dict[str, Any]:
        """Everything of the loop a resume needs, beside model and optimizer (same on all ranks)."""
        return {
            STEP: self.step,
            EPOCH: self.epoch,
            BATCH_IN_EPOCH: self.batch_in_epoch,
            BATCH_USES: self.batch_uses,
            SCHEDULER: self.scheduler.state_dict() if self.scheduler else None,
            SCALER: self.scaler.state_dict() if self.scaler else None,
            CALLBACKS: [cb.state_dict() for cb in self.callbacks],
            CALLBACK_TYPES: [type(cb).__name__ for cb in self.callbacks],
            TASK: self.task.extra_state(),
            INTERVAL: self.interval.state_dict(),
            BAD_STEPS: self.bad_steps,
            TOTAL_BAD_STEPS: self.total_bad_steps,
            SPIKES: self.spikes.state_dict() if self.spikes is not None else None,
            LAST_VAL: self.last_val,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_in_epoch = (
            state[STEP],
            state[EPOCH],
            state[BATCH_IN_EPOCH],
        )
        self.batch_uses = state.get(BATCH_USES, 0)
        if self.scheduler is not None and state[SCHEDULER] is not None:
            self.scheduler.load_state_dict(state[SCHEDULER])
        if self.scaler is not None and state[SCALER]:
            self.scaler.load_state_dict(state[SCALER])
        saved = list(
            zip(state.get(CALLBACK_TYPES) or [None] * len(state[CALLBACKS]), state[CALLBACKS])
        )
        for cb in self.callbacks:  # by type: a resume may add or drop callbacks
            i = next((i for i, (t, _) in enumerate(saved) if t in (None, type(cb).__name__)), None)
            if i is not None:
                cb.load_state_dict(saved.pop(i)[1])
        self.task.load_extra_state(state.get(TASK, {}))
        self.interval.load_state_dict(state[INTERVAL], self.strategy.device)
        self.bad_steps, self.total_bad_steps = state[BAD_STEPS], state[TOTAL_BAD_STEPS]
        if self.spikes is not None and state.get(SPIKES):
            self.spikes.load_state_dict(state[SPIKES])
        self.last_val = state.get(LAST_VAL, {})

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's own state: its random generators and the task's per-rank state."""
        return {RNG: rng_state(), TASK: self.task.rank_state()}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        self.task.load_rank_state(state.get(TASK, {}))
        if RNG in state:  # a rank that did not exist when saving starts from its seed
            set_rng_state(state[RNG])

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        accum = self.cfg.grad_accum_steps
        while self.step < self.max_steps and not self._stopping():
            self.train_loader.set_epoch(self.epoch, self.batch_in_epoch)
            for batch in self.train_loader:
                i = self.batch_in_epoch
                group_start = i - i % accum
                n_micro = min(accum, self.batches_per_epoch - group_start)
                final = i - group_start == n_micro - 1
                batch = self.strategy.to_device(batch)
                if self.batch_uses == 0:  # samples and tokens count once, however many steps
                    self.interval.add_batch(batch)
                    if self.audit is not None:
                        self.audit.add(self.train_loader.indices)
                # a batch serves steps_per_batch optimizer steps (one, but for rollout reuse;
                # a resume may come back in the middle of them)
                for _ in range(self.batch_uses, self.steps_per_batch):
                    self.batch_uses = (self.batch_uses + 1) % self.steps_per_batch
                    if self.batch_uses == 0:  # its last use: the loader's place moves past it
                        self.batch_in_epoch += 1
                    self._micro_step(batch, final, n_micro)
                    if final:
                        self._optimizer_step()
                        if self.step >= self.max_steps or self._stopping():
                            break
                if self.step >= self.max_steps or self._stopping():  # (both move only in a step)
                    break
        evaluates = self.cfg.eval_every_n_steps or self.cfg.eval_every_n_epochs
        if evaluates and self._last_eval != self.step and not self._signal:
            self.evaluate()
        if self.checkpoints is not None and (self.checkpoints.cfg.save_last or self._signal):
            self.save()

    def _micro_step(self, batch: Any, final: bool, n_micro: int) -> None:
        """Forward and backward of one loader batch; its outputs join the step's."""
        if self.peak and self.flops_per_micro is None:
            from src.core.throughput import measure_flops

            out, self.flops_per_micro = measure_flops(
                lambda: self.train_step(batch, final, n_micro)
            )
        else:
            out = self.train_step(batch, final, n_micro)
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.ndim == 0:  # metrics: mean of micros
                self._micro[k] = v if n_micro == 1 else self._micro.get(k, 0) + v / n_micro
            else:  # features, labels ...: the last micro-batch's, for callbacks
                self._extras[k] = v

    def _optimizer_step(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.before_update()  # a background save has finished copying
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = self.strategy.clip_grad_norm(self.model, self.cfg.grad_clip)
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self, norm)
        outputs, self._micro = self._micro, {}
        extras, self._extras = self._extras, {}
        # The one host sync per step: a bad update must not be applied, and every rank must take
        # the same decision (and stop on a signal) at the same step. The norm is of unscaled
        # gradients (fp16: after unscale_), so a loss scaler's overflow is caught here too.
        loss, spike = outputs["loss"], None
        if self.spikes is not None:  # a spike is judged on a value every rank shares, and
            # marked as non-finite: the decision below skips it alike on every rank, no new sync
            world = self.strategy.world_size
            mean_loss = self.strategy.reduce({"loss": loss.detach().float()})["loss"] / world
            spike = self.spikes.is_spike(mean_loss)
            loss = torch.where(spike, float("nan"), loss.detach())
            norm = torch.where(spike, float("nan"), norm) if norm is not None else None
        bad, self._signal = self.strategy.step_decision(loss, norm, self._pending_signal)
        # A strategy whose engine checks gradients itself (DeepSpeed) may still skip the update.
        applied = not bad and self.strategy.optimizer_step(self.optimizer, self.scaler)
        if applied:
            if self.scheduler is not None:
                self.scheduler.step()
            self.bad_steps = 0
            outputs["grad_norm"] = self.strategy.grad_norm_after_step(norm)
            self.interval.add_step(outputs)
            if self.spikes is not None:
                self.spikes.record(mean_loss)
        elif spike is not None and self.spikes is not None and bool(spike):  # (host read on skip)
            if self.scaler is not None:
                self.scaler.update()
            self.strategy.discard_step()
            self.spikes.skipped += 1
            warnings.warn(
                f"step {self.step + 1}: {self.spikes.describe(mean_loss)}; update "
                f"skipped (trainer.loss_spike_sigmas = {self.spikes.sigmas:g})",
                stacklevel=2,
            )
        else:
            if bad:
                if self.scaler is not None:
                    self.scaler.update()  # unscale_ recorded the overflow: the scale backs off
                self.strategy.discard_step()
            self.total_bad_steps += 1
            # A loss scaler's overflow (finite loss, gradients out of fp16 range) only lowers the
            # scale: it is skipped and counted, but it is no sign of divergence.
            if not self._scaler_overflow(outputs["loss"], bad):
                self.bad_steps += 1
        self.strategy.zero_grad(self.optimizer)
        self.step += 1
        if self.audit is not None:  # before anything saves this step
            self.audit.commit(self.step, self.epoch)
        if self.bad_steps:
            self._on_bad_step()
        self.task.on_step_end(self.step, self.max_steps)
        if self.callbacks:
            step_outputs = {**extras, **outputs}
            for cb in self.callbacks:
                cb.on_step_end(self, step_outputs)
        self._after_step()

    def _after_step(self) -> None:
        cfg = self.cfg
        if self.step % cfg.log_every == 0 or self.step == self.max_steps:
            self._log_interval()
        epoch_end = self.batch_in_epoch >= self.batches_per_epoch
        if epoch_end:
            self.epoch += 1
            self.batch_in_epoch = 0
        if (cfg.eval_every_n_steps and self.step % cfg.eval_every_n_steps == 0) or (
            epoch_end and cfg.eval_every_n_epochs and self.epoch % cfg.eval_every_n_epochs == 0
        ):
            self.evaluate()
        if epoch_end:
            for cb in self.callbacks:
                cb.on_epoch_end(self)
        if self.checkpoints is not None and self._save_due(epoch_end):
            self.save()

    def _save_due(self, epoch_end: bool) -> bool:
        ck = self.checkpoints.cfg
        return bool(
            (ck.every_n_steps and self.step % ck.every_n_steps == 0)
            or (epoch_end and ck.every_n_epochs and self.epoch % ck.every_n_epochs == 0)
            or (self.checkpoints.save_on_eval and self._last_eval == self.step)
        )

    def _scaler_overflow(self, loss: torch.Tensor, bad: bool) -> bool:
        """Was this skipped step a loss scaler's overflow (a finite loss on every rank, under our
        GradScaler or an engine that skipped the update itself)? Asked on skipped steps only,
        which every rank takes alike."""
        return (self.scaler is not None or not bad) and self.strategy.all_finite(loss)

    def _on_bad_step(self) -> None:
        warnings.warn(
            f"step {self.step}: non-finite loss or gradient, update skipped "
            f"({self.bad_steps} in a row)",
            stacklevel=2,
        )
        if self.bad_steps >= self.cfg.max_bad_steps:
            path = self.save()
            where = f"; last good state saved to {path}" if path else ""
            raise TrainingDiverged(
                f"training stopped at step {self.step}: {self.bad_steps} "
                f"consecutive non-finite steps (trainer.max_bad_steps){where}"
            )

    # ------------------------------------------------------------------ logging

    def _log_interval(self) -> None:
        metrics = {
            "epoch": self.epoch,
            **self.interval.read(
                self.strategy, self.optimizer.param_groups[0]["lr"], self.flops_per_micro, self.peak
            ),
        }
        if self.group_lrs:
            groups = self.optimizer.param_groups
            metrics.update({name: groups[i]["lr"] for name, i in self.group_lrs})
        if self.total_bad_steps:
            metrics["train/bad_steps"] = self.total_bad_steps
        if self.spikes is not None and self.spikes.skipped:
            metrics["train/spikes_skipped"] = self.spikes.skipped
        self.interval.reset()
        self.last_logged = metrics
        self._emit(metrics)

    def _emit(self, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_log(self, metrics)
        if self.strategy.is_main:
            for lg in self.loggers:
                lg.log(metrics, self.step)

    # ------------------------------------------------------------------ helpers

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.strategy.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def _off_the_clock(self):
        """Evaluation and checkpoint time count in no training throughput (samples/s, MFU)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.interval.pause(time.perf_counter() - t0)

    def _on_signal(self, signum: int) -> None:
        self._pending_signal = signum  # acted on at the end of the step, by every rank

    def _stopping(self) -> bool:
        return self.should_stop or bool(self._signal)

    def _resume(self, announce: bool = True) -> int:
        if self.checkpoints is None:
            return 0
        got = self.checkpoints.load(self.model, self.optimizer)
        if got is None:
            return 0
        path, state, rank_state = got
        self.load_state_dict(state)
        self.load_rank_state_dict(rank_state)
        self._last_save = self._last_eval = self.step
        if self.strategy.is_main and announce:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch})", flush=True)
            if self.step >= self.max_steps:
                print(
                    f"this run already finished at step {self.step} of {self.max_steps}; raise "
                    "trainer.max_steps (or max_epochs) to train on",
                    flush=True,
                )
        return self.step
