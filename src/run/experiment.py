"""From a validated config to a running experiment: each section built by its registry.

    cfg, origins = prepare("configs/exp001.yaml", ["trainer.max_steps=50"])
    exp = build(cfg, origins)      # data, model, task, strategy, optimizer, scheduler, loaders
    exp.run()                      # writes experiments/<name>/ and trains

Nothing is written to disk before ``run()``: a config, data or model error leaves no run folder.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from src.core.config import (
    DICT_SOURCE,
    ExperimentConfig,
    dump_config,
    flatten,
    load_config,
    missing_needs,
    raw_component_errors,
    validate_components,
)
from src.core.console import attach_log, banner, summary
from src.core.errors import ConfigError, UserError
from src.core.param_groups import (
    apply_freeze,
    build_optimizer,
    build_scheduler,
    format_table,
    group_lr_metrics,
    shapes_groups,
    write_param_groups,
)
from src.core.registry import (
    CALLBACKS,
    DATASETS,
    LOGGERS,
    MODELS,
    SAMPLERS,
    STRATEGIES,
    TASKS,
    TRANSFORMS,
    Lazy,
    building,
)
from src.run.catalog import load_builtins
from src.run.plugins import import_user_modules, load_plugins


def prepare(
    path: str | dict, overrides: Sequence[str] = (), extra_imports: Sequence[str] = ()
) -> tuple[ExperimentConfig, dict[str, str]]:
    """Load and fully validate a config (a file, or a dict of its sections), component
    parameters included; builds nothing."""
    source = DICT_SOURCE if isinstance(path, dict) else str(path)
    try:
        cfg, origins = load_config(path, list(overrides))
    except ConfigError as exc:
        data = getattr(exc, "data", None)
        if data is None or exc.origins is None:
            raise
        load_builtins()  # every problem in one run: the sections' parameters too
        more = raw_component_errors(data, exc.origins, source)
        raise ConfigError(*exc.lines, *more) from None
    missing = missing_needs(cfg)
    if missing:
        raise ConfigError(*missing)
    load_builtins()
    load_plugins()
    import_user_modules(list(extra_imports), "--import")
    import_user_modules(cfg.imports)
    validate_components(cfg, origins, source)
    return cfg, origins


@dataclass
class Experiment:
    """Every built component of a run, ready to train."""

    cfg: ExperimentConfig
    origins: dict[str, str]
    strategy: Any
    data: Any
    task: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    derived: dict[str, Any] = field(default_factory=dict)
    trainer: Any = None  # set by run()
    callbacks: list = field(default_factory=list)  # built callbacks added to the config's
    param_groups: list = field(default_factory=list)  # the optimizer's resolved groups (a table)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.logging.root) / self.cfg.name

    def summary(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.task.parameters())
        trainable = sum(p.numel() for p in self.task.parameters() if p.requires_grad)
        return {
            "model_parameters": params,
            "trainable_parameters": trainable,
            "train_samples": len(self.data.train),
            "val_samples": len(self.data.val) if self.data.val is not None else 0,
            **self.derived,
        }

    def run_info(self) -> dict[str, Any]:
        """Provenance: each value with where it came from: ``file`` (the config), ``base`` (a file
        it inherits), ``cli`` (an override), ``default``, ``data``, ``derived`` or ``environment``."""
        params: dict[str, Any] = {}
        origin: dict[str, str] = {}
        main_file = self.origins.get("")
        for k, v in flatten(self.cfg.model_dump(mode="json")).items():
            params[k] = v
            src = _source(k, self.origins)
            origin[k] = (
                "default"
                if src is None
                else "cli"
                if src.startswith("override")
                else "file"
                if src == main_file
                else "base"
            )
        info = self.data.info
        facts = {
            "data.num_classes": info.num_classes,
            "data.input_shape": list(info.input_shape),
            "data.num_train": len(self.data.train),
            "data.num_val": len(self.data.val) if self.data.val is not None else 0,
        }
        if info.extra.get("token_stores"):  # which token stores the run read
            facts["data.token_stores"] = [f["path"] for f in info.extra["token_stores"]]
        import torch

        env = {
            "env.python": platform.python_version(),
            "env.torch": torch.__version__,
            "env.platform": platform.platform(),
            "env.device": str(self.strategy.device),
            "env.world_size": self.strategy.world_size,
        }
        if self.strategy.device.type == "cuda":
            env["env.gpu"] = torch.cuda.get_device_name(self.strategy.device)
        for group, kind in (
            (facts, "data"),
            ({f"derived.{k}": v for k, v in self.derived.items()}, "derived"),
            (env, "environment"),
        ):
            params.update(group)
            origin.update({k: kind for k in group})
        from src.core.model_summary import summarize

        rows, totals = summarize(self.task)
        return {
            "params": params,
            "origin": origin,
            "derived": self.derived,
            "model_summary": {"layers": rows, **totals},
            "param_groups": self.param_groups,
        }

    def run(self) -> dict[str, float]:
        """Decide new / resume / extend for the run folder, then train.

        Nothing is written to the folder until the trainer has loaded the checkpoint it resumes
        from (see :mod:`src.run.record`): a refused or failed resume changes nothing. The
        folder is locked for the whole run (:mod:`src.run.lock`): a second run is refused.
        """
        from src.run.lock import run_folder_lock

        with run_folder_lock(self.run_dir, self.strategy):  # one writer per run folder
            return self._run()

    def _run(self) -> dict[str, float]:
        import yaml

        from src.core.checkpoint import CheckpointManager
        from src.core.trainer import Trainer
        from src.run.record import decide, write_record

        cfg, run_dir, strategy = self.cfg, self.run_dir, self.strategy
        resolved = dump_config(cfg)
        ckpt = CheckpointManager(
            cfg.checkpoint,
            run_dir / "checkpoints",
            strategy,
            hashlib.sha256(resolved.encode()).hexdigest()[:16],
        )
        if cfg.checkpoint.resume == "never" and ckpt.committed():
            raise ConfigError(
                f"checkpoint.resume: never, but {ckpt.dir} holds checkpoints of an "
                "earlier run; choose another name (or --new-run) or resume it"
            )
        ckpt.candidates()  # an explicit resume path is checked before anything is written
        defaults = frozenset(k for k, o in self.run_info()["origin"].items() if o == "default")
        decision = decide(run_dir, yaml.safe_load(resolved), bool(ckpt.committed()), defaults)
        horizon = decision.horizon or self.derived["total_steps"]
        if horizon != self.derived["total_steps"]:  # an extended run keeps its schedule
            self.scheduler = build_scheduler(cfg, self.optimizer, horizon)
        self.derived["schedule_horizon"] = horizon
        self.decision = decision
        info = self.run_info()  # for the record and the loggers, with the horizon in it

        def record() -> None:  # called by the trainer once the checkpoint (if any) has loaded
            if strategy.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_record(run_dir, resolved, info, decision)
                write_param_groups(run_dir, self.param_groups)
                attach_log(run_dir)
                print(banner(self, decision, self.trainer.step), flush=True)
                if shapes_groups(cfg):
                    print("\n".join(format_table(self.param_groups)), flush=True)
                tokenizer = self.data.info.extra.get("tokenizer")
                if tokenizer is not None and not (run_dir / "tokenizer").exists():
                    tokenizer.save_pretrained(str(run_dir / "tokenizer"))  # reused on resume
            strategy.barrier()

        callbacks = [CALLBACKS.build(s, f"callbacks.{i}") for i, s in enumerate(cfg.callbacks)]
        callbacks += self.callbacks
        from src.core.callbacks.progress import RichProgressBar

        if (
            strategy.is_main
            and sys.stdout.isatty()
            and not any(isinstance(cb, RichProgressBar) for cb in callbacks)
        ):
            callbacks.append(RichProgressBar(transient=True))  # a live bar on a terminal
        loggers = []
        if strategy.is_main:  # loggers write nothing before start(), which follows record()
            for i, s in enumerate(cfg.logging.loggers):
                section = {"type": s} if isinstance(s, str) else s
                loggers.append(LOGGERS.build(section, f"logging.loggers.{i}", run_dir=run_dir))
        trainer = Trainer(
            cfg.trainer,
            task=self.task,
            model=self.model,
            strategy=strategy,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            train_loader=self.train_loader,
            val_loader=self.val_loader,
            max_steps=self.derived["total_steps"],
            callbacks=callbacks,
            loggers=loggers,
            checkpoints=ckpt,
            run_dir=run_dir,
            run_info=info,
            on_start=record,
            group_lrs=group_lr_metrics(self.param_groups) if shapes_groups(cfg) else (),
            audit_dir=run_dir / "audit" if cfg.data.audit else None,
        )
        self.trainer = trainer
        t0 = time.perf_counter()
        metrics = trainer.fit()
        if strategy.is_main:
            print(summary(self, metrics, time.perf_counter() - t0), flush=True)
        return metrics


def build(cfg: ExperimentConfig, origins: Optional[dict[str, str]] = None) -> Experiment:
    """Build every component of ``cfg`` (already validated by :func:`prepare`)."""
    load_builtins()  # a config validated elsewhere names built-in components too
    from src.core.loop_settings import LoopSettings
    from src.core.seeding import seed_everything, set_deterministic
    from src.data.loader import TrainLoader, eval_loader, sample_labels, sample_lengths
    from src.data.samplers import ShardedBatchSampler

    strategy = STRATEGIES.build(cfg.strategy, "strategy")
    with building("strategy"):
        strategy.setup()
    if cfg.trainer.compile and strategy.device.type == "cpu":
        # inductor's C++ backend imports cpp_extension, which warns that no CUDA toolkit is found
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        # inductor's own random numbers (dropout masks) are slower on the CPU than ATen's: with
        # ATen's, a compiled GPT-2 trains ~9% faster at 384 wide, and draws the eager model's
        # dropout masks (the same losses; tests/algorithms/test_causal_lm.py)
        import torch._inductor.config

        torch._inductor.config.fallback_random = True
    seed_everything(cfg.seed)  # the same initial weights on every rank (FSDP shards them as built)
    set_deterministic(cfg.trainer.deterministic)

    d = cfg.data
    world = strategy.world_size
    if d.batch_size % world:
        raise ConfigError(
            f"data.batch_size: {d.batch_size} does not divide among {world} processes"
        )
    data, model, task = build_task(cfg)
    with building("trainer.gradient_checkpointing"):
        _apply_model_switches(model, cfg)
    apply_freeze(task, cfg.freeze)
    views = task.train_views()
    transform = TRANSFORMS.build(views, "task.views") if views is not None else None
    if getattr(transform, "batched", False):  # made by the task, for the batch on its device
        task.device_views = transform
    elif transform is not None:  # self-supervised tasks train on per-sample augmented views
        if not hasattr(data.train, "view_transform"):
            raise ConfigError(
                f"data: dataset '{d.type}' cannot produce the views task "
                f"'{cfg.task['type']}' trains on"
            )
        data.train.view_transform = transform

    per_rank = d.batch_size // world
    sampler = d.sampler
    if sampler is None:
        batches = ShardedBatchSampler(
            len(data.train), per_rank, cfg.seed, d.shuffle, strategy.rank, world, d.drop_last
        )
    else:
        batches = SAMPLERS.build(
            sampler,
            "data.sampler",
            labels=Lazy(lambda: sample_labels(data.train, sampler["type"])),
            lengths=Lazy(lambda: sample_lengths(data.train)),
            batch_size=per_rank,
            seed=cfg.seed,
            rank=strategy.rank,
            world_size=world,
        )
    train_loader = TrainLoader(data.train, batches, cfg.seed, d.num_workers, d.pin_memory)
    if train_loader.num_workers != d.num_workers and strategy.is_main:
        import warnings

        warnings.warn(
            f"data.num_workers: {d.num_workers} -> 0: dataset '{d.type}' is held in "
            "memory and gathers each batch in one operation; worker processes would "
            "only copy it through a pipe (slower)",
            stacklevel=2,
        )
    val_loader = eval_loader(
        data.val,
        (d.eval_batch_size or d.batch_size) // world or 1,
        strategy.rank,
        world,
        d.num_workers,
        d.pin_memory,
    )
    per_epoch = train_loader.batches_per_epoch()
    if per_epoch == 0:
        raise ConfigError(
            f"data.batch_size: {d.batch_size} is larger than the training set "
            f"({len(data.train)} samples over {world} processes)"
        )
    t = cfg.trainer
    reuse = task.steps_per_batch  # a rollout's optimizer steps all train on its batch
    if reuse > 1 and t.grad_accum_steps > 1:
        raise ConfigError(
            f"trainer.grad_accum_steps: {t.grad_accum_steps} with task "
            f"'{cfg.task['type']}', whose rollouts serve {reuse} steps each: keep 1 "
            "(GRPO's micro_batch bounds memory instead)"
        )
    steps_per_epoch = math.ceil(per_epoch / t.grad_accum_steps) * reuse
    limits = [s for s in (t.max_steps, t.max_epochs and t.max_epochs * steps_per_epoch) if s]
    if not limits:
        raise ConfigError("trainer: set max_steps or max_epochs (training stops at the first)")
    total = min(limits)

    with building("strategy"):
        strategy.configure(LoopSettings.of(cfg))
        task.collectives = strategy.collectives()  # the task's own cross-rank tensors
        table: list[dict] = []

        def make_optimizer(m):  # over the parameters as placed (FSDP: the sharded ones)
            optimizer, rows = build_optimizer(m, cfg)
            table.extend(rows)
            return optimizer

        model_w, optimizer = strategy.wrap(task, make_optimizer)
    if t.compile:  # after wrapping, so DDP keeps its overlap and FSDP its hooks outside graphs
        with building("trainer.compile"):
            strategy.compile(model_w)
    scheduler = build_scheduler(cfg, optimizer, total)
    seed_everything(cfg.seed, strategy.rank)  # from here on, each rank draws its own randomness
    derived = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "model_parameters": sum(p.numel() for p in task.parameters()),
        "trainable_parameters": sum(p.numel() for p in task.parameters() if p.requires_grad),
        "batches_per_epoch": per_epoch,
        "per_rank_batch_size": per_rank,
        "effective_batch_size": d.batch_size * t.grad_accum_steps,
        "world_size": world,
    }
    exp = Experiment(
        cfg,
        origins or {},
        strategy,
        data,
        task,
        model_w,
        optimizer,
        scheduler,
        train_loader,
        val_loader,
        derived,
    )
    exp.param_groups = table
    return exp


def build_task(cfg: ExperimentConfig, run_dir: Optional[Path] = None) -> tuple[Any, Any, Any]:
    """The data, the model and the task of ``cfg``, configured from the data; no strategy, no
    optimizer (what predict and export need, and the first half of :func:`build`)."""
    run_dir = run_dir if run_dir is not None else Path(cfg.logging.root) / cfg.name
    data = DATASETS.build(
        {"type": cfg.data.type, **(cfg.data.model_extra or {})},
        "data",
        seed=cfg.seed,
        run_dir=run_dir,
    )
    model = MODELS.build(cfg.model, "model", info=data.info)
    task = TASKS.build(cfg.task, "task", model=model)
    with building("task"):
        task.configure(data.info)
    _materialize_lazy(task, data, cfg)
    return data, model, task


def _materialize_lazy(task, data, cfg: ExperimentConfig) -> None:
    """Lazy layers (``nn.LazyLinear`` ...) get their shapes from one forward pass of a sample
    batch of the training data, before anything counts, moves or shards the parameters (as
    Lightning documents for them). The task's inference model runs it, in eval mode."""
    import torch
    from torch.nn.parameter import is_lazy

    from src.data.loader import sample_batch

    def lazy() -> list[str]:
        return [n for n, t in [*task.named_parameters(), *task.named_buffers()] if is_lazy(t)]

    if not lazy():
        return
    what = (
        f"model '{cfg.model['type']}' has lazy layers (nn.LazyLinear ...), which take their "
        "shapes from a forward pass"
    )
    try:
        inf = task.inference()
    except UserError:
        raise ConfigError(
            f"model: {what}; task '{cfg.task['type']}' has no inference model to "
            "run one on a sample batch: give those layers their input sizes"
        ) from None
    was_training = task.training
    task.eval()
    try:
        with torch.no_grad(), building("model"):
            inf.module(*inf.inputs_of(sample_batch(data.train, 2)))
    finally:
        task.train(was_training)
    left = lazy()
    if left:
        raise ConfigError(
            f"model: {what}; a forward pass of the inference model left "
            f"{', '.join(left[:3])}{' ...' if len(left) > 3 else ''} without one: "
            "give those layers their input sizes"
        )


def _apply_model_switches(model, cfg: ExperimentConfig) -> None:
    t = cfg.trainer
    if t.gradient_checkpointing:
        if hasattr(model, "gradient_checkpointing_enable"):  # transformers
            model.gradient_checkpointing_enable()
        elif hasattr(model, "set_grad_checkpointing"):  # timm
            model.set_grad_checkpointing(True)
        else:
            raise ConfigError(
                f"trainer.gradient_checkpointing: model '{cfg.model['type']}' "
                "supports it only for transformers and timm models"
            )


def _source(path: str, origins: dict[str, str]) -> Optional[str]:
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in origins:
            return origins[".".join(parts[:n])]
    return None


__all__ = ["Experiment", "build", "build_task", "prepare", "UserError"]
