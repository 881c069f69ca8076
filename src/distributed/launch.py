"""Launcher detection: pure functions, tested for every rank in one process.

torchrun and the deepspeed launcher both export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT to each process they start; a distributed strategy refuses to start without them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from src.core.errors import ConfigError

LAUNCH_HINT = (
    "torchrun --nproc_per_node N -m src.main --config C strategy.type={s}  "
    "(or: deepspeed --num_gpus N --module src.main --config C strategy.type={s})"
)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def launch_env(strategy: str, env: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Read the launcher's variables; a one-line error says how to launch when they are missing."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ConfigError(
            f"strategy.type: '{strategy}' needs a launcher ({', '.join(missing)} "
            f"not set); run: {LAUNCH_HINT.format(s=strategy)}"
        )
    world = int(env["WORLD_SIZE"])
    return LaunchEnv(
        rank=int(env["RANK"]),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=world,
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
    )
