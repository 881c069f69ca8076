"""Any timm architecture by name. Pretrained weights only from a local file: nothing downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import Field

from src.core.dataset_info import DatasetInfo
from src.core.errors import ConfigError
from src.core.registry import MODELS


def load_local_weights(model, path: str, strict: bool = False) -> None:
    """Load a safetensors or torch state dict from ``path`` into ``model`` (safe loading only).

    Classifier weights whose shape differs (another number of classes) are skipped.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.pretrained_path: file not found: {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k not in own or own[k].shape == v.shape}
    model.load_state_dict(state, strict=strict)


@MODELS.register("timm")
def timm_model(
    info: DatasetInfo,
    name: Annotated[
        str, Field(description="a timm architecture (resnet18, vit_tiny_patch16_224, ...)")
    ],
    pretrained_path: Annotated[
        Optional[str],
        Field(description="local .safetensors/.pth weights; never fetched from a hub"),
    ] = None,
    num_classes: Annotated[
        Optional[int], Field(description="override the data's class count (0 = feature extractor)")
    ] = None,
    **kwargs: Any,
):
    """``timm.create_model(name, num_classes=info.num_classes, in_chans=C, **kwargs)``."""
    import timm

    if name not in timm.list_models():
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.name: unknown timm architecture '{name}'{hint}")
    classes = info.num_classes or 0 if num_classes is None else num_classes
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=classes, in_chans=info.input_shape[0], **kwargs
        )
    except TypeError as exc:
        raise ConfigError(f"model: timm '{name}' rejected its arguments: {exc}") from None
    if pretrained_path:
        load_local_weights(model, pretrained_path)
    return model
