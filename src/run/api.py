"""The Python API: build, train, evaluate and predict from a notebook or a script.

    from src import Experiment
    exp = Experiment.from_yaml("configs/exp001.yaml", ["trainer.max_steps=50"])
    exp.fit(); exp.evaluate(); exp.predict()

    exp = Experiment.from_modules(my_module, train_dataset, val_dataset, loss_fn=my_loss,
                                  config={"trainer": {"max_epochs": 5}})

An :class:`Experiment` wraps the built components (:class:`src.run.experiment.Experiment`: its
``cfg``, ``task``, ``optimizer``, ``strategy``, ``data``, ... read through it) and runs them as
the command line does. Errors are :class:`src.core.errors.UserError` with the command line's
one-line messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from src.core.errors import ConfigError, UserError
from src.core.registry import CALLBACKS
from src.run.experiment import Experiment as Built
from src.run.experiment import build, prepare

if TYPE_CHECKING:
    from src.core.trainer import Trainer


class Experiment:
    """A built experiment and what a user does with it: ``fit``, ``evaluate``, ``predict``."""

    def __init__(self, built: Built):
        self.built = built

    def __getattr__(self, name: str) -> Any:  # cfg, task, model, optimizer, data, run_dir, ...
        if name == "built":
            raise AttributeError(name)
        return getattr(self.built, name)

    @classmethod
    def from_yaml(
        cls, path: str | Path, overrides: Sequence[str] = (), imports: Sequence[str] = ()
    ) -> Experiment:
        """Build the experiment of a config file, as ``python -m src.main --config PATH``
        would (``overrides``: ``["trainer.max_steps=50", ...]``)."""
        cfg, origins = prepare(str(path), list(overrides), list(imports))
        return cls(build(cfg, origins))

    @classmethod
    def from_dict(
        cls, config: dict, overrides: Sequence[str] = (), imports: Sequence[str] = ()
    ) -> Experiment:
        """Build the experiment of a config given as a dict of its sections (``base:`` paths
        are relative to the current folder); validated exactly like a file."""
        cfg, origins = prepare(config, list(overrides), list(imports))
        return cls(build(cfg, origins))

    @classmethod
    def from_modules(
        cls,
        model,
        train,
        val=None,
        loss_fn="cross_entropy",
        *,
        name: Optional[str] = None,
        num_classes: Optional[int] = None,
        config: Optional[dict] = None,
        overrides: Sequence[str] = (),
    ) -> Experiment:
        """Train your own ``nn.Module`` on your own datasets (or DataLoaders) with your own loss
        function (or a ``torch.nn.functional`` loss name), with the platform's strategies,
        checkpoints, callbacks and loggers. ``config`` holds any other section (``optimizer``,
        ``trainer``, ``callbacks``, ``strategy``, ...); the run folder is
        ``experiments/<name>/`` (default: the model's class name)."""
        from src.core import objects

        loader = _loader_options(train)
        d = {"name": name or type(model).__name__.lower(), **(config or {})}
        d["model"] = {"type": "module", "ref": objects.put(model)}
        d["task"] = {
            "type": "supervised",
            **d.get("task", {}),
            "loss": loss_fn if isinstance(loss_fn, str) else objects.put(loss_fn),
        }
        data = {
            **loader,
            **d.get("data", {}),
            "type": "objects",
            "train": objects.put(train, f"[{_length(train)}]"),
        }
        if val is not None:
            data["val"] = objects.put(val, f"[{_length(val)}]:val")
        if num_classes is not None:
            data["num_classes"] = num_classes
        d["data"] = data
        return cls.from_dict(d, overrides)

    def fit(self) -> dict[str, float]:
        """Train (or resume the run folder's latest checkpoint and train on); the final metrics."""
        return self.built.run()

    def evaluate(self) -> dict[str, float]:
        """``val/...`` metrics of the weights in memory: after ``fit()``, the trained ones;
        before, the run folder's latest committed checkpoint (if any) is loaded first."""
        trainer = self.trainer
        if trainer is None:
            trainer = self._eval_trainer()
            trainer._resume(announce=False)
            for cb in trainer.callbacks:  # EMA weights, as restored, for evaluation
                if getattr(cb, "shapes_evaluation", False):
                    cb.on_fit_start(trainer)
        loggers, trainer.loggers = trainer.loggers, []  # nothing written to the run
        try:
            return trainer.evaluate()
        finally:
            trainer.loggers = loggers

    def predict(
        self, data=None, split: str = "val", batch_size: Optional[int] = None, **options
    ) -> dict[str, Any]:
        """Predictions of the weights in memory for every sample of ``data`` (a dataset) or of
        the run's ``split``: ``{"id": ..., output: array (N, ...)}`` as ``predict`` writes them
        (``probs`` for classification, ``outputs`` for a plain module, ...)."""
        from types import SimpleNamespace

        from src.run.predict import predict

        if self.trainer is None:
            self._eval_trainer()._resume(announce=False)
        if data is None:
            data = self.data.val if split == "val" else self.data.train
            if data is None:
                raise ConfigError(f"predict: the run has no {split} split")
        elif not hasattr(data, "collate_fn") and not getattr(data, "batched", False):
            from src.data.objects import Samples

            data = Samples(data)
        run = SimpleNamespace(task=self.task, cfg=self.cfg)
        was_training = self.task.training
        self.task.eval()
        try:
            out = predict(
                run,
                data,
                batch_size or self.cfg.data.eval_batch_size or self.cfg.data.batch_size,
                options=options,
                progress=False,
                device=self.strategy.device,
            )
        finally:
            self.task.train(was_training)
        assert out is not None  # one process: it is the main one
        return out

    def _eval_trainer(self) -> Trainer:
        from src.core.checkpoint import CheckpointManager
        from src.core.trainer import Trainer

        ckpt = CheckpointManager(
            self.cfg.checkpoint, self.run_dir / "checkpoints", self.strategy, ""
        )
        callbacks = [CALLBACKS.build(s, f"callbacks.{i}") for i, s in enumerate(self.cfg.callbacks)]
        self.built.trainer = Trainer(
            self.cfg.trainer,
            task=self.task,
            model=self.model,
            strategy=self.strategy,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            train_loader=self.train_loader,
            val_loader=self.val_loader,
            max_steps=self.derived["total_steps"],
            checkpoints=ckpt,
            run_dir=self.run_dir,
            callbacks=callbacks + self.callbacks,
            audit_dir=self.run_dir / "audit" if self.cfg.data.audit else None,
        )
        return self.built.trainer


def _loader_options(data) -> dict[str, Any]:
    """``batch_size`` (and ``shuffle``/``drop_last``) of a DataLoader given to the API."""
    from torch.utils.data import DataLoader

    if not isinstance(data, DataLoader) or data.batch_size is None:
        return {}
    return {"batch_size": data.batch_size, "drop_last": data.drop_last}


def _length(data) -> int:
    try:
        return len(getattr(data, "dataset", data))
    except TypeError:
        return 0


__all__ = ["Experiment", "UserError"]
