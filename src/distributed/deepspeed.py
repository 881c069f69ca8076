"""DeepSpeed (ZeRO stages 0-3, offload, ...): launch with the ``deepspeed`` launcher or torchrun.

The DeepSpeed config is built from the one validated YAML: micro-batch size, accumulation,
gradient clipping and precision come from ``data`` and ``trainer``; the optimizer and the lr
schedule are ours (built from their sections and handed to DeepSpeed). Everything else in
``strategy.config`` (``zero_optimization``, offload, communication knobs ...) passes through to
DeepSpeed untouched; a pass-through value that contradicts our sections is an error naming both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from typing_extensions import override

from src.core.checkpoint import DEEPSPEED_DIR, META, TRAINER_FILE
from src.core.errors import CheckpointError, ConfigError
from src.core.registry import STRATEGIES
from src.distributed.base import LoopSettings, safe_load
from src.distributed.process_group import Backend, ProcessGroupStrategy, Timeout

TAG = DEEPSPEED_DIR  # DeepSpeed's checkpoint tag: its folder inside the step folder
UNIVERSAL_TAG = DEEPSPEED_DIR + "_universal"  # the same shards converted for another world size
# DeepSpeed keys that our own sections own: key -> (our dotted path, how to read our value)
OWNED = {
    "train_micro_batch_size_per_gpu": "data.batch_size / world size",
    "gradient_accumulation_steps": "trainer.grad_accum_steps",
    "train_batch_size": "data.batch_size x trainer.grad_accum_steps",
    "gradient_clipping": "trainer.grad_clip",
}


def is_deepspeed_checkpoint(directory: Path) -> bool:
    return (Path(directory) / TAG).is_dir()


def consolidated_deepspeed_state(directory: Path) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from ZeRO shards with DeepSpeed's own zero_to_fp32 code."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def cpu_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """DeepSpeed's CPU Adam with the groups and hyper-parameters of a torch Adam or AdamW: the
    optimizer ZeRO-Offload steps on the CPU (it compiles DeepSpeed's cpu_adam op once)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    d = optimizer.defaults
    groups = [
        {"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
        for g in optimizer.param_groups
    ]
    return DeepSpeedCPUAdam(
        groups,
        lr=d["lr"],
        betas=d["betas"],
        eps=d["eps"],
        weight_decay=d["weight_decay"],
        adamw_mode=isinstance(optimizer, torch.optim.AdamW),
    )


def _norm_statistics_to(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """BatchNorm's running statistics in ``dtype``: DeepSpeed casts parameters to fp16/bf16 but
    keeps buffers in fp32 (for rotary tables), and batch_norm takes one dtype for all."""
    for m in module.modules():
        if not isinstance(m, torch.nn.modules.batchnorm._NormBase):
            continue
        if m.running_mean is not None and m.running_var is not None:
            m.running_mean.data = m.running_mean.data.to(dtype)
            m.running_var.data = m.running_var.data.to(dtype)


@STRATEGIES.register("deepspeed")
class DeepSpeedStrategy(ProcessGroupStrategy):
    """``deepspeed.initialize`` over the task, with a config built from ours."""

    name = "deepspeed"
    owns_precision = True  # DeepSpeed casts the model and scales fp16 losses itself

    def __init__(
        self,
        backend: Backend = "auto",
        timeout_s: Timeout = 1800,
        config: Annotated[
            dict[str, Any],
            Field(
                description="DeepSpeed config entries passed through (zero_optimization: {stage: 2} "
                "...)"
            ),
        ] = {},
    ):
        super().__init__(backend, timeout_s)
        self.user_config = dict(config)
        self.ds_config: dict[str, Any] = {}
        self.cpu_adam = self.engine_checks_gradients = False
        self._accumulating = False

    @override
    def setup(self) -> None:
        import deepspeed

        super().setup()
        if self.device.type == "cpu":  # a buffer left by a killed run on this port would be
            self._remove_shm_buffer()  # mapped by the other ranks as if it were this one's
            torch.distributed.barrier()
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())

    def _shm_buffer(self) -> Path:
        """The shared-memory file DeepSpeed's CPU all-reduce makes for this rank and never
        removes (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, 69 MB each): one
        per rank and run, so repeated CPU runs fill ``/dev/shm`` until the machine runs out of
        memory, and a stale one on a reused port hangs the next run's start."""
        addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
        return (
            Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{self.rank}"
        )

    def _remove_shm_buffer(self) -> None:
        with contextlib.suppress(OSError):
            self._shm_buffer().unlink()

    @override
    def teardown(self, in_step: bool = True, keep_group: bool = False) -> None:
        super().teardown(in_step, keep_group)
        # Only once every rank has passed its last collective: a rank still starting would wait
        # for the name forever. After an error the next run's setup removes it instead.
        if in_step and self.device.type == "cpu":  # the mappings stay valid; only the name goes
            self._remove_shm_buffer()

    @override
    @classmethod
    def config_errors(cls, section: dict[str, Any], settings: LoopSettings) -> list[str]:
        lines = super().config_errors(section, settings)
        stage = ((section.get("config") or {}).get("zero_optimization") or {}).get("stage")
        if settings.adapter == "qlora" and stage == 3:
            lines.append(
                "model.adapter.type: qlora's 4-bit weights cannot be sharded by ZeRO "
                "stage 3; use ddp or ZeRO stage 1-2, or lora"
            )
        return lines

    @override
    def configure(self, settings: LoopSettings) -> None:
        """Build the DeepSpeed config from the experiment's sections; refuse contradictions."""
        super().configure(settings)
        s = settings
        ours: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": s.batch_size // self.world_size,
            "gradient_accumulation_steps": s.grad_accum_steps,
            "train_batch_size": s.batch_size * s.grad_accum_steps,
            "gradient_clipping": s.grad_clip or 0.0,
            "bf16": {"enabled": s.precision == "bf16"},
            "fp16": {"enabled": s.precision == "fp16"},
        }
        user = self.user_config
        if s.async_save:
            raise ConfigError(
                "checkpoint.async_save: not available with deepspeed; configure "
                "DeepSpeed's own checkpoint engine in strategy.config instead"
            )
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise ConfigError(
                    f"strategy.config.{key}: set by the '{key}' section, not in the "
                    "DeepSpeed pass-through"
                )
        for key, ours_path in OWNED.items():
            if key in user and user[key] != ours[key]:
                raise ConfigError(
                    f"strategy.config.{key}: {user[key]} conflicts with {ours_path} "
                    f"= {ours[key]}; set it in one place"
                )
        for key in ("bf16", "fp16"):
            if key in user and bool(user[key].get("enabled")) != ours[key]["enabled"]:
                raise ConfigError(
                    f"strategy.config.{key}.enabled: {user[key].get('enabled')} "
                    f"conflicts with trainer.precision = {s.precision}"
                )
        offload = (user.get("zero_optimization") or {}).get("offload_optimizer") or {}
        # ZeRO-Offload steps DeepSpeed's own CPU Adam unless the user forces another optimizer
        self.cpu_adam = (
            offload.get("device", "none") in ("cpu", "nvme")
            and "zero_force_ds_cpu_optimizer" not in user
        )
        if self.cpu_adam and s.optimizer not in ("adam", "adamw"):
            raise ConfigError(
                f"strategy.config.zero_optimization.offload_optimizer: DeepSpeed offloads only its "
                f"own CPU Adam (optimizer.type adam or adamw, not '{s.optimizer}'); or "
                "set strategy.config.zero_force_ds_cpu_optimizer: false to step ours on the CPU"
            )
        merged = {**ours, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        for key, value in user.items():
            merged[key] = {**merged[key], **value} if isinstance(merged.get(key), dict) else value
        self.ds_config = merged

    @override
    def wrap(self, task, make_optimizer=None):
        import deepspeed

        optimizer = make_optimizer(task)
        if self.cpu_adam:
            optimizer = cpu_adam(optimizer)
        engine, _, _, _ = deepspeed.initialize(
            model=task, optimizer=optimizer, config=self.ds_config
        )
        self.engine = engine
        self.device = (
            engine.device
            if isinstance(engine.device, torch.device)
            else torch.device(engine.device)
        )
        # DeepSpeed casts the parameters to fp16/bf16 but not the inputs, and autocast is off
        # (the engine owns precision): floating-point batch tensors take the engine's dtype.
        self.input_dtype = (
            torch.bfloat16
            if engine.bfloat16_enabled()
            else torch.float16
            if engine.fp16_enabled()
            else None
        )
        if self.input_dtype is not None:
            _norm_statistics_to(engine.module, self.input_dtype)
        # ZeRO's optimizers and DeepSpeed's fp16/bf16 ones compute the global gradient norm and
        # skip a non-finite update themselves, clearing their own (partitioned) gradient buffers;
        # only ZeRO stage 0 in fp32 steps a plain torch optimizer on ``p.grad``.
        self.engine_checks_gradients = (
            engine.zero_optimization_stage() > 0 or self.input_dtype is not None
        )
        if self.engine_checks_gradients and self.settings.skip_loss_spikes:
            raise ConfigError(
                "trainer.loss_spike_sigmas: not available with DeepSpeed ZeRO "
                "stages 1-3 or fp16/bf16, whose engine steps (and clears) its own "
                "gradient buffers every step; use ZeRO stage 0 in fp32, or ddp/fsdp"
            )
        return engine, optimizer

    @override
    def unwrap(self, model):
        return getattr(model, "module", model)

    @override
    @contextlib.contextmanager
    def no_sync(self, model) -> Iterator[None]:
        self._accumulating = True
        try:
            yield
        finally:
            self._accumulating = False

    @override
    def backward(self, loss: torch.Tensor) -> None:
        # We tell DeepSpeed where the accumulation boundary is (our loop may end an epoch on a
        # shorter accumulation) and have already divided the loss by the micro-batch count.
        self.engine.set_gradient_accumulation_boundary(not self._accumulating)
        self.engine.backward(loss, scale_wrt_gas=False)

    @override
    def step_decision(self, loss, grad_norm, signal: int) -> tuple[bool, int]:
        """Where the engine checks gradients, every rank calls engine.step() and DeepSpeed skips
        a bad update (``optimizer_step`` reports it), so a discarded gradient never lingers in
        ZeRO's buffers; otherwise the norm computed from the all-reduced gradients decides."""
        if self.engine_checks_gradients:
            return False, self._agree_signal(signal)
        return super().step_decision(loss, grad_norm, signal)

    @override
    def zero_grad(self, optimizer) -> None:
        """The engine frees gradients in its step. The optimizer we built now steps ZeRO's flat
        fp32 partitions, whose ``.grad`` ZeRO-Offload keeps as its buffer: not ours to free."""

    @override
    def discard_step(self) -> None:
        self.engine.zero_grad()  # ZeRO stage 0, fp32: the gradients are the parameters' .grad

    @override
    def clip_grad_norm(self, model, max_norm):
        """DeepSpeed clips inside step() (gradient_clipping). Stage 0 in fp32 keeps gradients in
        ``p.grad``: their norm (unclipped) is what the step decision and the log use."""
        if self.engine_checks_gradients:
            return torch.zeros((), device=self.device)
        return super().clip_grad_norm(model, None)

    @override
    def optimizer_step(self, optimizer, scaler=None) -> bool:
        self.engine.step()
        return self.engine.was_step_applied()

    @override
    def grad_norm_after_step(self, norm: torch.Tensor) -> torch.Tensor:
        """The engine's global norm (a float or a tensor, None where it computes none), as a
        float32 tensor on the training device, so it stacks with the other metrics."""
        value = self.engine.get_global_grad_norm()
        if value is None:
            return (
                norm.float()
                if not self.engine_checks_gradients
                else torch.full((), float("nan"), device=self.device)
            )
        return torch.as_tensor(value, dtype=torch.float32).to(self.device)

    @override
    def save(
        self,
        directory: Path,
        model,
        optimizer,
        trainer_state: dict,
        rank_state: dict,
        async_save: bool = False,
    ):
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        self._save_small(directory, trainer_state, rank_state)
        return None

    def _load_universal(self, directory: Path, saved_world: int) -> None:
        """ZeRO shards written by ``saved_world`` ranks, loaded by this many: converted once to
        DeepSpeed's universal format (``deepspeed_universal/`` beside the shards, kept for the
        next resume) and loaded with ``load_universal``, optimizer state included."""
        import subprocess
        import sys

        universal = directory / UNIVERSAL_TAG
        if self.is_main and not (universal / "zero").is_dir():
            tmp = directory / (UNIVERSAL_TAG + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder",
                    str(directory / TAG),
                    "--output_folder",
                    str(tmp),
                    "--inject_missing_state",
                    "--num_extract_workers",
                    "1",
                    "--num_merge_workers",
                    "1",
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0 or not (tmp / "zero").is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise CheckpointError(
                    f"{directory / TAG}: written by {saved_world} DeepSpeed ranks; converting it "
                    f"for {self.world_size} with ds_to_universal failed ({last[:200]}); "
                    f"relaunch with {saved_world} ranks"
                )
            shutil.rmtree(universal, ignore_errors=True)
            os.replace(tmp, universal)
        torch.distributed.barrier()
        config = self.engine._config
        config.load_universal_checkpoint = True
        try:
            path, _ = self.engine.load_checkpoint(
                str(directory), tag=UNIVERSAL_TAG, load_lr_scheduler_states=False
            )
        finally:
            config.load_universal_checkpoint = False
        if path is None:
            raise CheckpointError(f"{universal}: DeepSpeed could not load this checkpoint")

    @override
    def load(self, directory: Path, model, optimizer):
        meta_path = directory / META
        saved_world = (
            json.loads(meta_path.read_text()).get("world_size") if meta_path.exists() else None
        )
        if not is_deepspeed_checkpoint(directory):
            raise CheckpointError(
                f"{directory}: not a DeepSpeed checkpoint; resume it with the "
                "strategy that wrote it, or export its weights"
            )
        if saved_world is not None and saved_world != self.world_size:
            if self.engine.zero_optimization_stage() == 3:  # its universal load loses state
                raise CheckpointError(
                    f"{directory}: written by {saved_world} DeepSpeed ZeRO-3 ranks, resumed with "
                    f"{self.world_size}; ZeRO-3 shards resume only at the world size that wrote "
                    f"them (stages 1 and 2 convert): relaunch with {saved_world} ranks"
                )
            self._load_universal(directory, saved_world)
        else:
            path, _ = self.engine.load_checkpoint(
                str(directory), tag=TAG, load_lr_scheduler_states=False
            )
            if path is None:
                raise CheckpointError(
                    f"{directory / TAG}: DeepSpeed could not load this checkpoint"
                )
        return safe_load(directory / TRAINER_FILE), self._rank_state(directory)
