"""Strategies decide how the task is spread over processes and devices. Each registers itself in
STRATEGIES; this package imports every built-in one."""

from src.distributed import ddp, deepspeed, fsdp, single
