"""The Strategy contract (after Lightning Fabric's): a small abstract base, one subclass per way
to run, and the helpers every strategy shares (device choice, batch placement, safe loading).

The trainer only talks to a strategy; tasks never know which one runs them.
"""

from __future__ import annotations

import abc
import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from src.core.checkpoint import MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE, rank_file
from src.core.collectives import Collectives
from src.core.errors import CheckpointError, CheckpointMismatchError
from src.core.loop_settings import LoopSettings


def pick_device(device: str = "auto", path: str = "strategy.device") -> torch.device:
    """``auto``: cuda > mps > cpu; otherwise the device named, which must exist here."""
    if device != "auto":
        from src.core.errors import ConfigError, shown

        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ConfigError(
                f"{path}: {shown(device)} is not a device (auto, cpu, cuda, cuda:N, mps)"
            ) from None
        if dev.type == "cuda" and (
            not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
        ):
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ConfigError(f"{path}: {device} does not exist here ({have} CUDA devices)")
        if dev.type == "mps" and not (
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        ):
            raise ConfigError(f"{path}: mps is not available here")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"{path}: {device}: training runs on cpu, cuda or mps")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def move_batch(batch: Any, device: torch.device, float_dtype: Optional[torch.dtype] = None) -> Any:
    """Tensors of a (nested) batch moved to ``device``; floating ones cast to ``float_dtype``."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return (
            batch.to(float_dtype)
            if float_dtype is not None and batch.is_floating_point()
            else batch
        )
    if isinstance(batch, dict):
        return {k: move_batch(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device, float_dtype) for v in batch)
    return batch


def safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with a one-line error naming a missing or corrupt file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file missing")
    try:
        with warnings.catch_warnings():  # a damaged file also warns; the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, disallowed global ...
        raise CheckpointError(
            f"{path}: unreadable checkpoint file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def fill_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """safetensors stores a tied tensor once: give each missing alias its partner's tensor."""
    own = model.state_dict()
    for k in own:
        if k not in state:
            for other, v in own.items():
                if other in state and v.data_ptr() == own[k].data_ptr():
                    state[k] = state[other]
                    break


def check_shapes(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Raise a CheckpointError that lists every key whose shape or presence does not match."""
    own = model.state_dict()
    bad = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if bad or missing or unexpected:
        parts = []
        if bad:
            parts.append(
                "shape mismatch: " + ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else "")
            )
        if missing:
            parts.append(
                "missing: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            )
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:10]))
        raise CheckpointMismatchError(
            f"{where}: checkpoint does not fit the model; " + "; ".join(parts)
        )


class Strategy(abc.ABC):
    """How a run uses processes and devices (after Lightning Fabric's ``Strategy``).

    The trainer talks only to its strategy; tasks never know which one runs them. A new strategy
    subclasses this (or ``ProcessGroupStrategy`` for one process per device), registers itself
    with ``@STRATEGIES.register("name")`` and implements the abstract members. The calls come in
    this order:

    1. ``__init__(**section)`` with its own YAML section, validated against the signature.
    2. ``setup()``: join the process group, set ``rank``, ``local_rank``, ``world_size``,
       ``device``. Nothing is built yet.
    3. ``configure(settings)``: the loop's :class:`LoopSettings`; refuse combinations the strategy
       cannot run with a ``ConfigError`` naming the config key.
    4. ``wrap(task, make_optimizer)``: place (shard, wrap) the task; build the optimizer with
       ``make_optimizer(task)`` once the parameters are where they stay; return both.
       ``unwrap(model)`` gives the task back; ``compile(model)`` compiles it in place.
    5. Every micro-step: ``to_device(batch)``, forward, ``backward(loss)`` (inside
       ``no_sync(model)`` on non-final accumulation steps). Every optimizer step:
       ``clip_grad_norm``, ``step_decision`` (skip a non-finite update alike on every rank, agree
       on stop signals), ``optimizer_step`` or ``discard_step``, ``zero_grad``.
    6. Metrics and evaluation: ``reduce`` (sum or max of a dict of scalars over ranks) and
       ``gather`` (rows of every rank); ``barrier`` where ranks must meet. ``collectives()``
       is the handle a task gets for its own cross-rank tensors (DINO's centre, MoCo's queue).
    7. Checkpoints: ``save(dir, ...)`` writes model, optimizer, trainer and per-rank state into an
       existing step folder (the CheckpointManager owns the folder, the commit marker and
       rotation); ``load(dir, ...)`` restores them in place and returns (trainer_state,
       rank_state). File names come from ``src.core.checkpoint``.
    8. ``teardown(in_step)``: leave the process group (``in_step=False`` after an error another
       rank may not share: wait for nobody).

    Guarantees a strategy keeps: every collective is called on every rank in the same order;
    ``reduce``/``gather``/``step_decision`` return the same value on every rank; nothing in the
    per-step methods synchronises with the host except ``step_decision`` (one sync per step).
    The defaults below are those of one process owning the whole model.
    """

    owns_precision = (
        False  # True: the strategy casts and scales itself (no autocast, no GradScaler)
    )
    input_dtype: Optional[torch.dtype] = None  # floating inputs cast to it (DeepSpeed's fp16/bf16)
    rank = 0
    local_rank = 0
    world_size = 1
    device = torch.device("cpu")
    settings = LoopSettings()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes the run's shared files."""
        return self.rank == 0

    @abc.abstractmethod
    def setup(self) -> None:
        """Join the process group (if any), set rank, world size and device."""

    @classmethod
    def config_errors(cls, section: dict[str, Any], settings: LoopSettings) -> list[str]:
        """What this strategy cannot run, known from the config alone (its own ``section`` and
        the run's ``settings``): one line per problem, naming the config key. Checked with the
        rest of the config, before anything is built; subclasses add their own rules."""
        if (
            settings.weights_dtype == "fp16"
            and settings.precision == "fp16"
            and not cls.owns_precision
        ):
            return [
                "model.dtype: fp16 weights with trainer.precision: fp16 cannot train (the "
                "loss scaler refuses fp16 gradients); keep fp32 weights for fp16 autocast, "
                "or use bf16"
            ]
        return []

    def configure(self, settings: LoopSettings) -> None:
        """Receive the loop's settings once, before ``wrap``; refuse what cannot run."""
        self.settings = settings

    @abc.abstractmethod
    def wrap(
        self,
        task: nn.Module,
        make_optimizer: Optional[Callable[[nn.Module], torch.optim.Optimizer]] = None,
    ):
        """Place (and wrap) the task; build the optimizer over the placed parameters.

        Args:
            make_optimizer: ``task -> Optimizer``, called once the parameters are where they stay.
        Returns:
            (model to call in the loop, optimizer or None)
        """

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The task inside whatever ``wrap`` returned."""
        return model

    def compile(self, model: nn.Module) -> None:
        """``torch.compile`` the wrapped model in place (parameter names, and so checkpoints,
        stay the same): DDP's wrapper and DeepSpeed's engine compile with their hooks."""
        model.compile()

    def to_device(self, batch: Any) -> Any:
        """The batch on this strategy's device; floating tensors cast to ``input_dtype`` if set."""
        return move_batch(batch, self.device, self.input_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (already scaled) loss; DeepSpeed's engine overrides it."""
        loss.backward()

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Skip gradient synchronisation on non-final accumulation micro-steps."""
        yield

    def trainable(self, model: nn.Module) -> list[torch.Tensor]:
        """The model's trainable parameters, listed once (walking modules every step costs)."""
        if getattr(self, "_trainable_of", None) is not model:
            self._trainable_of = model
            self._trainable: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
        return self._trainable

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        """Total gradient 2-norm (a tensor, no sync); grads scaled down to ``max_norm`` if given."""
        params = [p for p in self.trainable(model) if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        grads = [p.grad for p in params if p.grad is not None]  # (all of them: the filter above)
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if max_norm is not None:  # takes the parameters: it scales each one's .grad in place
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler=None) -> bool:
        """Apply the update; returns whether it was applied (the trainer checked the gradients
        are finite, so here it always is)."""
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return True

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Free the gradients after an optimizer step (taken or skipped)."""
        optimizer.zero_grad(set_to_none=True)

    def discard_step(self) -> None:  # noqa: B027 (an optional hook: by default nothing to drop)
        """Drop a skipped step's gradients held outside the parameters (the trainer zeroes those)."""

    def grad_norm_after_step(self, norm: torch.Tensor) -> torch.Tensor:
        """The step's gradient norm for logging (strategies that clip inside step() override)."""
        return norm

    def collectives(self) -> Collectives:
        """The handle a task uses for its own cross-rank tensors (``task.collectives``)."""
        return Collectives()

    @abc.abstractmethod
    def reduce(self, values: dict[str, torch.Tensor], op: str = "sum") -> dict[str, torch.Tensor]:
        """Combine scalar tensors across ranks (``sum`` or ``max``); the same dict on every rank."""

    def all_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every rank (a host sync; collective across ranks)."""
        return bool(torch.isfinite(value).all())

    def step_decision(
        self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor], signal: int
    ) -> tuple[bool, int]:
        """(skip this update?, stop signal), decided alike on every rank; one host sync.

        NaN and inf survive the sum of loss and gradient norm, so one check covers both.
        """
        value = loss if grad_norm is None else loss + grad_norm
        return not bool(torch.isfinite(value)), signal

    @abc.abstractmethod
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows concatenated along dim 0 in rank order (lengths may differ)."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Return once every rank has called it."""

    # an optional hook (B027): one process has no group to leave
    def teardown(self, in_step: bool = True, keep_group: bool = False) -> None:  # noqa: B027
        """Leave the process group; ``in_step=False`` after an error another rank may not share
        (no rank may then be waited for). ``keep_group``: finish this run's collectives but keep
        the group for the next run of the same processes (a sweep's trials)."""

    def describe_failure(self, exc: BaseException) -> Optional[str]:
        """One line for an error that means the ranks fell out of step (None: not one of those)."""
        return None

    # ------------------------------------------------------------ checkpoints

    def save(
        self,
        directory: Path,
        model: nn.Module,
        optimizer,
        trainer_state: dict,
        rank_state: dict,
        async_save: bool = False,
    ):
        """Write one checkpoint's files into ``directory`` (which exists).

        With ``async_save``, a thread copies model and optimizer state and writes it through DCP;
        the returned :class:`BackgroundSave` says when the copy and the write are done (None when
        synchronous).
        """
        from safetensors.torch import save_model

        future = None
        if async_save:
            future = self._save_sharded(directory, model, optimizer, async_save=True)
        elif self.is_main:
            save_model(self.unwrap(model), str(directory / MODEL_FILE))
            if optimizer is not None:
                torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
        self._save_small(directory, trainer_state, rank_state)
        return future

    def _save_sharded(self, directory: Path, model, optimizer, async_save: bool):
        from src.distributed.dcp_io import save_dcp

        return save_dcp(directory, model, optimizer, async_save, self.checkpoint_group())

    def _save_small(self, directory: Path, trainer_state: dict, rank_state: dict) -> None:
        if self.is_main:
            torch.save(trainer_state, directory / TRAINER_FILE)
        torch.save(rank_state, directory / rank_file(self.rank))

    def checkpoint_group(self):
        """Process group for background checkpoint writes (None in one process)."""
        return None

    def load(self, directory: Path, model: nn.Module, optimizer) -> tuple[dict, dict]:
        """Restore model and optimizer in place; returns (trainer_state, this rank's state)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from src.distributed.dcp_io import has_dcp, load_dcp

        if has_dcp(directory):  # written by a sharded strategy: load it resharded to this one
            load_dcp(directory, model, optimizer)
            return safe_load(directory / TRAINER_FILE), self._rank_state(directory)
        path = directory / MODEL_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file missing")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint file ({exc})") from None
        module = self.unwrap(model)
        fill_tied(module, state)
        check_shapes(module, state, path)
        module.load_state_dict(state)
        if optimizer is not None:
            optimizer.load_state_dict(safe_load(directory / OPTIMIZER_FILE))
        return safe_load(directory / TRAINER_FILE), self._rank_state(directory)

    def _rank_state(self, directory: Path) -> dict:
        """This rank's RNG state; a rank that did not exist when saving starts from its seed."""
        path = directory / rank_file(self.rank)
        return safe_load(path) if path.exists() else {}
