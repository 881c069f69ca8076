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


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[03-05,07],gpu1`` -> ``node03``), as
    ``scontrol show hostnames`` would print it first."""
    import re

    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if m is None:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


PORT_BASE = 20000  # rendezvous ports of SLURM jobs: PORT_BASE + job id % PORT_BASE


def slurm_port(job_id: str) -> int:
    """A rendezvous port derived from the job id: jobs sharing a node use different ports."""
    return PORT_BASE + int(job_id) % PORT_BASE


def slurm_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The launcher variables of an ``srun`` task of a job with several tasks, started without
    torchrun: rank, world size and local rank from ``SLURM_PROCID``, ``SLURM_NTASKS`` and
    ``SLURM_LOCALID``, the rendezvous on the allocation's first host (as Lightning's
    SLURMEnvironment does). Empty when a launcher already set them, or not in such a task."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return {}
    ntasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")))
    if ntasks < 2:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
    local_world = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": local_world.split("(")[0].split(",")[0],
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_port(env.get("SLURM_JOB_ID", "0"))),
    }
