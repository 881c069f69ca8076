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
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from src.core.config import TrainerConfig
from src.core.seeding import rng_state, set_rng_state

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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

    def __init__(self, cfg: TrainerConfig, *, task, model, strategy, optimizer, scheduler,
                 train_loader, val_loader, max_steps: int, callbacks: Iterable = (),
                 loggers: Iterable = (), checkpoints=None,
                 run_dir: Optional[Path] = None, run_info: Optional[dict] = None,
                 on_start: Optional[Callable[[], None]] = None):
        self.cfg, self.task, self.model, self.strategy = cfg, task, model, strategy
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.max_steps, self.callbacks, self.loggers = max_steps, list(callbacks), list(loggers)
        self.checkpoints = checkpoints
        self.run_dir, self.run_info, self.on_start = run_dir, run_info or {}, on_start
        self.batches_per_epoch = train_loader.batches_per_epoch()
        self.step = self.epoch = self.batch_in_epoch = 0
        self.bad_steps = self.total_bad_steps = 0
        self.should_stop = False
        self.last_val: dict[str, float] = {}
        self.last_logged: dict[str, float] = {}
        self._signal = self._pending_signal = 0
        self._last_eval = self._last_save = -1
        device = strategy.device
        own = strategy.owns_precision
        self.dtype = None if own else DTYPES[cfg.precision]
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" and not own \
            else None
        from src.core.throughput import peak_flops

        self.peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(device, cfg.precision)
        self.flops_per_micro: Optional[int] = None  # measured once, on the first micro-batch
        self._reset_interval()

    # ------------------------------------------------------------------ public

    def fit(self) -> dict[str, float]:
        """Train (resuming first if a checkpoint is there); returns the last logged metrics."""
        resumed = self._resume()
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
            with self._catch_signals():
                self._run()
            status = "KILLED" if self._signal else "FINISHED"
        finally:
            if self.checkpoints is not None:
                self.checkpoints.wait()
            for cb in self.callbacks:
                cb.on_fit_end(self)
            for lg in self.loggers:
                lg.finish(status)
        if self._signal:
            if self.strategy.is_main:
                latest = self.checkpoints.latest() if self.checkpoints is not None else None
                saved = f"saved {latest}; " if latest is not None else ""
                print(f"stopped by {signal.Signals(self._signal).name} at step {self.step}; "
                      f"{saved}run the same command again to resume", flush=True)
            raise SystemExit(128 + self._signal)
        if self.run_dir is not None and self.strategy.is_main:
            self.task.write_artifacts(Path(self.run_dir))
        return {**self.last_logged, **self.last_val}

    def train_step(self, batch: Any, final: bool, n_micro: int) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; the override point for custom steps.

        Args:
            final: the last micro-batch of this optimizer step (gradients are synchronised).
            n_micro: micro-batches in this step (the loss is divided by it).
        Returns:
            The task's outputs, detached.
        """
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
                out = {k: v[:0] if isinstance(v, torch.Tensor) and v.ndim else v
                       for k, v in out.items()}
            for cb in self.callbacks:
                cb.on_validation_batch_end(self, out)
            n += bs
        self.task.padding_batch = False
        sums["_n"] = torch.tensor(float(n), device=self.strategy.device)
        totals = self.strategy.reduce(sums)
        count = totals.pop("_n")
        metrics = {f"val/{k}": v for k, v in
                   zip(totals, (torch.stack(list(totals.values())) / count).tolist())} if totals else {}
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
        state = {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "callback_types": [type(cb).__name__ for cb in self.callbacks],
            "task": self.task.extra_state(),
            "interval": {"sums": {k: v.cpu() for k, v in self._interval_sums().items()},
                         "steps": self._steps, "samples": self._samples,
                         "tokens": None if self._tokens is None else self._tokens.cpu()},
            "bad_steps": self.bad_steps, "total_bad_steps": self.total_bad_steps,
            "last_val": self.last_val,
        }
        path = self.checkpoints.save(self.step, self.epoch, self.model, self.optimizer, state,
                                     {"rng": rng_state(), "task": self.task.rank_state()},
                                     metrics=self.last_val,
                                     extra_files=self.task.write_checkpoint_files)
        self._last_save = self.step
        return path

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
                self.batch_in_epoch += 1
                batch = self.strategy.to_device(batch)
                self._count_batch(batch)
                if self.peak and self.flops_per_micro is None:
                    from src.core.throughput import measure_flops

                    out, self.flops_per_micro = measure_flops(
                        lambda: self.train_step(batch, final, n_micro))
                else:
                    out = self.train_step(batch, final, n_micro)
                self._micros += 1
                for k, v in out.items():
                    if isinstance(v, torch.Tensor) and v.ndim == 0:  # metrics: mean of micros
                        self._micro[k] = v if n_micro == 1 else self._micro.get(k, 0) + v / n_micro
                    else:  # features, labels ...: the last micro-batch's, for callbacks
                        self._extras[k] = v
                if final:
                    self._optimizer_step()
                    if self.step >= self.max_steps or self._stopping():
                        break
        evaluates = self.cfg.eval_every_n_steps or self.cfg.eval_every_n_epochs
        if evaluates and self._last_eval != self.step and not self._signal:
            self.evaluate()
        if self.checkpoints is not None and (self.checkpoints.cfg.save_last or self._signal):
            self.save()

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
        bad, self._signal = self.strategy.step_decision(outputs["loss"], norm,
                                                        self._pending_signal)
        # A strategy whose engine checks gradients itself (DeepSpeed) may still skip the update.
        applied = not bad and self.strategy.optimizer_step(self.optimizer, self.scaler)
        if applied:
            if self.scheduler is not None:
                self.scheduler.step()
            self.bad_steps = 0
            outputs["grad_norm"] = self.strategy.grad_norm_after_step(norm)
            self._accumulate(outputs)
            self._steps += 1
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
        if (cfg.eval_every_n_steps and self.step % cfg.eval_every_n_steps == 0) or \
                (epoch_end and cfg.eval_every_n_epochs and self.epoch % cfg.eval_every_n_epochs == 0):
            self.evaluate()
        if epoch_end:
            for cb in self.callbacks:
                cb.on_epoch_end(self)
        if self.checkpoints is not None and self._save_due(epoch_end):
            self.save()

    def _save_due(self, epoch_end: bool) -> bool:
        ck = self.checkpoints.cfg
        return bool((ck.every_n_steps and self.step % ck.every_n_steps == 0)
                    or (epoch_end and ck.every_n_epochs and self.epoch % ck.every_n_epochs == 0)
                    or (self.checkpoints.save_on_eval and self._last_eval == self.step))

    def _scaler_overflow(self, loss: torch.Tensor, bad: bool) -> bool:
        """Was this skipped step a loss scaler's overflow (a finite loss on every rank, under our
        GradScaler or an engine that skipped the update itself)? Asked on skipped steps only,
        which every rank takes alike."""
        return (self.scaler is not None or not bad) and self.strategy.all_finite(loss)

    def _on_bad_step(self) -> None:
        warnings.warn(f"step {self.step}: non-finite loss or gradient, update skipped "
                      f"({self.bad_steps} in a row)", stacklevel=2)
        if self.bad_steps >= self.cfg.max_bad_steps:
            path = self.save()
            where = f"; last good state saved to {path}" if path else ""
            raise TrainingDiverged(f"training stopped at step {self.step}: {self.bad_steps} "
                                   f"consecutive non-finite steps (trainer.max_bad_steps){where}")

    # ------------------------------------------------------------------ logging

    def _reset_interval(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._sum_keys: tuple[str, ...] = ()
        self._sum_vec: Optional[torch.Tensor] = None
        self._micro: dict[str, torch.Tensor] = {}
        self._extras: dict[str, Any] = {}
        self._steps = self._samples = self._micros = 0
        self._tokens: Optional[torch.Tensor] = None
        self._t0 = time.perf_counter()

    def _accumulate(self, outputs: dict[str, torch.Tensor]) -> None:
        """Add this step's scalars to the interval sums: one stack and one add, no sync."""
        keys = tuple(outputs)
        dev = outputs[keys[0]].device  # the loss's; a gradient norm may sit on the CPU (offload)
        vec = torch.stack([outputs[k].float().to(dev, non_blocking=True) for k in keys])
        if keys == self._sum_keys:
            self._sum_vec += vec
        else:  # first step of an interval, or the task returned other keys
            for k, v in zip(self._sum_keys, self._sum_vec.unbind() if self._sum_keys else ()):
                self._sums[k] = self._sums.get(k, 0) + v
            self._sum_keys, self._sum_vec = keys, vec

    def _interval_sums(self) -> dict[str, torch.Tensor]:
        sums = dict(self._sums)
        for k, v in zip(self._sum_keys, self._sum_vec.unbind() if self._sum_keys else ()):
            sums[k] = sums.get(k, 0) + v
        return sums

    def _count_batch(self, batch: Any) -> None:
        self._samples += batch_size_of(batch)
        if isinstance(batch, dict) and ("attention_mask" in batch or "input_ids" in batch):
            mask = batch.get("attention_mask")
            n = mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel())
            self._tokens = n if self._tokens is None else self._tokens + n

    def _log_interval(self) -> None:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        sums = self._interval_sums()
        sums["_steps"] = torch.tensor(float(self._steps), device=self.strategy.device)
        if self._tokens is not None:
            sums["_tokens"] = self._tokens.to(self.strategy.device).float()
        totals = self.strategy.reduce(sums)
        steps = totals.pop("_steps")
        tokens = totals.pop("_tokens", None)
        names = list(totals)
        values = (torch.stack([totals[k] for k in names]) / steps.clamp(min=1)).tolist() if names else []
        metrics: dict[str, float] = {"epoch": self.epoch}
        metrics.update({f"train/{k}": v for k, v in zip(names, values)})
        metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["train/samples_per_sec"] = self._samples * self.strategy.world_size / elapsed
        if tokens is not None:
            metrics["train/tokens_per_sec"] = float(tokens) / elapsed
        if self.peak and self.flops_per_micro:
            achieved = self.flops_per_micro * self._micros / elapsed
            metrics["train/tflops"] = achieved / 1e12
            metrics["train/mfu"] = achieved / self.peak
        if self.total_bad_steps:
            metrics["train/bad_steps"] = self.total_bad_steps
        self._reset_interval()
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
            self._t0 += time.perf_counter() - t0

    def _stopping(self) -> bool:
        return self.should_stop or bool(self._signal)

    def _resume(self) -> int:
        if self.checkpoints is None:
            return 0
        got = self.checkpoints.load(self.model, self.optimizer)
        if got is None:
            return 0
        path, state, rank_state = got
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        saved = list(zip(state.get("callback_types") or [None] * len(state["callbacks"]),
                         state["callbacks"]))
        for cb in self.callbacks:  # by type: a resume may add or drop callbacks
            i = next((i for i, (t, _) in enumerate(saved) if t in (None, type(cb).__name__)), None)
            if i is not None:
                cb.load_state_dict(saved.pop(i)[1])
        self.task.load_extra_state(state.get("task", {}))
        self.task.load_rank_state(rank_state.get("task", {}))
        dev = self.strategy.device
        iv = state["interval"]
        sums = {k: v.to(dev) for k, v in iv["sums"].items()}
        if sums:  # continue the same running sums, so the logged averages match bit for bit
            self._sum_keys, self._sum_vec = tuple(sums), torch.stack(list(sums.values()))
        self._steps, self._samples, self._tokens = iv["steps"], iv["samples"], iv["tokens"]
        self.bad_steps, self.total_bad_steps = state["bad_steps"], state["total_bad_steps"]
        self.last_val = state.get("last_val", {})
        if "rng" in rank_state:
            set_rng_state(rank_state["rng"])
        self._last_save = self._last_eval = self.step
        if self.strategy.is_main:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch})", flush=True)
            if self.step >= self.max_steps:
                print(f"this run already finished at step {self.step} of {self.max_steps}; raise "
                      "trainer.max_steps (or max_epochs) to train on", flush=True)
        return self.step

    @contextlib.contextmanager
    def _catch_signals(self):
        """SIGTERM/SIGINT: finish the current step, checkpoint, exit with 128 + signal."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._pending_signal = signum  # acted on at the end of the step, by every rank

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch (first dimension of its first tensor)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return int(batch.shape[0])
