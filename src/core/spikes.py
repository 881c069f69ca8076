"""Loss-spike skipping (after OLMo's skip-step optimizers): an update whose loss exceeds the mean
of the last ``window`` applied steps by more than ``sigmas`` standard deviations is skipped.

The loss judged is the mean over ranks, so every rank takes the same decision; the history lives
on the training device, so judging a step costs no host sync (the trainer folds the verdict into
its one per-step sync). Steps are judged once the window is full.
"""

from __future__ import annotations

from typing import Any

import torch


class SpikeGuard:
    def __init__(self, sigmas: float, window: int, device: torch.device):
        self.sigmas, self.window = float(sigmas), int(window)
        self.history = torch.zeros(self.window, device=device)
        self.count = 0  # applied steps recorded (host-side: the trainer knows when it applied)
        self.skipped = 0

    @property
    def judging(self) -> bool:
        return self.count >= self.window

    def is_spike(self, loss: torch.Tensor) -> torch.Tensor:
        """A 0-d bool tensor: is ``loss`` (the mean over ranks) a spike? False while filling."""
        if not self.judging:
            return torch.zeros((), dtype=torch.bool, device=loss.device)
        mean, std = self.history.mean(), self.history.std()
        return loss.detach().float() > mean + self.sigmas * std

    def describe(self, loss: torch.Tensor) -> str:
        """How far above the recent losses ``loss`` was (host values; asked on skipped steps)."""
        mean, std = self.history.mean().item(), self.history.std().item()
        value = loss.item()
        return (
            f"loss {value:.4g} is {(value - mean) / max(std, 1e-12):.1f} standard deviations "
            f"above the mean {mean:.4g} of the last {self.window} steps"
        )

    def record(self, loss: torch.Tensor) -> None:
        """Add an applied step's loss (mean over ranks) to the history."""
        self.history[self.count % self.window] = loss.detach().float()
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.cpu(), "count": self.count, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("history") is not None and len(state["history"]) == self.window:
            self.history.copy_(state["history"].to(self.history.device))
            self.count = int(state["count"])
        self.skipped = int(state.get("skipped", 0))
