"""A checkpoint's weights in one process, whichever strategy wrote them (one safetensors file,
DCP shards, a DeepSpeed checkpoint): what predict, export and a later stage's ``init`` read."""

from __future__ import annotations

from pathlib import Path

import torch

from src.core.errors import CheckpointError


def load_consolidated(directory: Path, trust_pickles: bool = False) -> dict[str, torch.Tensor]:
    """The task's full state dict from a committed checkpoint directory of any strategy (its
    pickles checked first unless ``trust_pickles``)."""
    from src.core.checkpoint import MODEL_FILE, find_checkpoint
    from src.core.pickle_guard import verify_checkpoint
    from src.distributed.dcp_io import consolidated_model_state, has_dcp

    directory = find_checkpoint(Path(directory))
    verify_checkpoint(directory, trust=trust_pickles)
    if (directory / MODEL_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(str(directory / MODEL_FILE))
    if has_dcp(directory):
        return consolidated_model_state(directory)
    from src.distributed.deepspeed import consolidated_deepspeed_state, is_deepspeed_checkpoint

    if is_deepspeed_checkpoint(directory):
        return consolidated_deepspeed_state(directory)
    raise CheckpointError(
        f"{directory}: no model weights found (model.safetensors, dcp/ or a DeepSpeed checkpoint)"
    )
