"""A model given as a Python object (``Experiment.from_modules(model=...)``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from src.core import objects
from src.core.dataset_info import DatasetInfo
from src.core.registry import MODELS


@MODELS.register("module")
def module(
    info: DatasetInfo,
    ref: Annotated[str, Field(description="the object's reference (set by the Python API)")],
):
    """The ``torch.nn.Module`` passed to ``Experiment.from_modules``, trained in place."""
    import torch

    model = objects.get(ref, "model.ref")
    if not isinstance(model, torch.nn.Module):
        from src.core.errors import ConfigError

        raise ConfigError(f"model: a torch.nn.Module is needed (got {type(model).__name__})")
    return model
