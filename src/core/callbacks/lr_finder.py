"""Learning-rate range test (Smith, 2017) before training; model and optimizer are restored after."""

from __future__ import annotations

import copy
import json
import math
from typing import Annotated, Optional

from pydantic import Field

from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS
from src.core.seeding import rng_state, set_rng_state


def suggest_lr(
    lrs: list[float], losses: list[float], skip_start: int = 5, skip_end: int = 2
) -> Optional[float]:
    """The lr where the smoothed loss falls fastest (steepest negative slope in log-lr)."""
    lo, hi = skip_start, max(len(lrs) - skip_end, skip_start + 2)
    xs, ys = [math.log10(x) for x in lrs[lo:hi]], losses[lo:hi]
    if len(xs) < 3:
        return None
    slopes = [(ys[i + 1] - ys[i - 1]) / (xs[i + 1] - xs[i - 1]) for i in range(1, len(xs) - 1)]
    best = min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[lo + best + 1]


@CALLBACKS.register("lr_finder")
class LRFinder(Callback):
    """Sweep the lr exponentially from ``min_lr`` to ``max_lr`` over ``num_steps`` real steps.

    Writes ``lr_finder.png`` (loss against lr) and ``lr_finder.json`` (the curve and the
    suggested lr) to the run folder, then restores model, optimizer and RNG state, so training
    starts exactly as it would have. With ``apply``, training uses the suggested lr.
    """

    def __init__(
        self,
        min_lr: Annotated[float, Field(gt=0, description="first lr of the sweep")] = 1e-7,
        max_lr: Annotated[float, Field(gt=0, description="last lr of the sweep")] = 1.0,
        num_steps: Annotated[
            int,
            Field(ge=5, description="steps of the sweep (real optimizer steps, undone afterwards)"),
        ] = 100,
        early_stop_threshold: Annotated[
            float,
            Field(
                gt=1, description="stop when the smoothed loss exceeds this multiple of the best"
            ),
        ] = 4.0,
        smoothing: Annotated[
            float, Field(ge=0, lt=1, description="weight of each new loss in the running average")
        ] = 0.05,
        apply: Annotated[bool, Field(description="set the suggested lr for the run")] = False,
    ):
        self.min_lr, self.max_lr, self.num_steps = min_lr, max_lr, num_steps
        self.threshold, self.smoothing, self.apply = early_stop_threshold, smoothing, apply
        self.suggested: Optional[float] = None
        self.done = False

    def on_fit_start(self, trainer) -> None:
        if self.done or trainer.step > 0:
            return  # a resumed run has had its range test
        model_state = copy.deepcopy(trainer.task.state_dict())
        opt_state = copy.deepcopy(trainer.optimizer.state_dict())
        rng = rng_state()
        lrs, losses = self._sweep(trainer)
        trainer.task.load_state_dict(model_state)
        trainer.optimizer.load_state_dict(opt_state)
        set_rng_state(rng)
        self.suggested = suggest_lr(lrs, losses)
        self.done = True
        if self.apply and self.suggested:
            self._apply(trainer)
        if trainer.strategy.is_main and trainer.run_dir is not None:
            self._write(trainer.run_dir, lrs, losses)
            print(f"lr_finder: suggested lr {self.suggested}", flush=True)

    def _apply(self, trainer) -> None:
        """Scale every group's lr (and the schedule's base) so group 0 starts at the suggestion."""
        groups = trainer.optimizer.param_groups
        factor = self.suggested / groups[0].get("initial_lr", groups[0]["lr"])
        for g in groups:
            g["lr"] *= factor
            if "initial_lr" in g:
                g["initial_lr"] *= factor
        if hasattr(trainer.scheduler, "base_lrs"):
            trainer.scheduler.base_lrs = [b * factor for b in trainer.scheduler.base_lrs]

    def _sweep(self, trainer) -> tuple[list[float], list[float]]:
        ratio = (self.max_lr / self.min_lr) ** (1 / (self.num_steps - 1))
        lrs, losses = [], []
        smooth, best = None, math.inf
        loader = trainer.train_loader
        loader.set_epoch(0)
        batches = iter(loader)
        for i in range(self.num_steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            lr = self.min_lr * ratio**i
            for g in trainer.optimizer.param_groups:
                g["lr"] = lr
            out = trainer.train_step(trainer.strategy.to_device(batch), True, 1)
            trainer.strategy.optimizer_step(trainer.optimizer, trainer.scaler)
            trainer.strategy.zero_grad(trainer.optimizer)
            loss = float(out["loss"])
            smooth = (
                loss if smooth is None else self.smoothing * loss + (1 - self.smoothing) * smooth
            )
            lrs.append(lr)
            losses.append(smooth)
            best = min(best, smooth)
            if not math.isfinite(smooth) or smooth > self.threshold * best:
                break
        return lrs, losses

    def _write(self, run_dir, lrs, losses) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        (run_dir / "lr_finder.json").write_text(
            json.dumps({"suggested_lr": self.suggested, "lr": lrs, "loss": losses})
        )
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lrs, losses)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss (smoothed)")
        if self.suggested:
            ax.axvline(
                self.suggested, color="red", linestyle="--", label=f"suggested {self.suggested:.2e}"
            )
            ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "lr_finder.png", dpi=100)
        plt.close(fig)

    def state_dict(self) -> dict:
        return {"suggested": self.suggested, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.suggested, self.done = state["suggested"], state["done"]
