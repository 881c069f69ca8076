"""transformers models, from a local folder or built from a config to train from scratch.

Nothing is downloaded: ``path`` is a local folder (or ``pkg:<package>/<sub/folder>``, a folder
inside an installed Python package), loaded with ``local_files_only``. An optional ``adapter``
section wraps the model with PEFT (LoRA, QLoRA, prefix tuning), see src/models/adapters.py.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Optional

from pydantic import Field

from src.core.dataset_info import DatasetInfo
from src.core.errors import ConfigError
from src.core.local_paths import resolve_path
from src.core.registry import MODELS

Kind = Literal["causal_lm", "seq2seq", "masked_lm", "sequence_classification", "base"]
AUTO_CLASSES: dict[Kind, str] = {
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}


@MODELS.register("hf")
def hf_model(
    info: DatasetInfo,
    kind: Annotated[
        Kind,
        Field(
            description="which Auto class (causal_lm, seq2seq, masked_lm, sequence_classification, "
            "base)"
        ),
    ] = "causal_lm",
    path: Annotated[
        Optional[str],
        Field(description="local folder with config and weights (pkg:... for a packaged model)"),
    ] = None,
    config: Annotated[
        Optional[dict[str, Any]],
        Field(
            description="build from scratch instead: {model_type: gpt2, n_layer: 4, ...}; the "
            "vocabulary size and (for classification) number of labels come from "
            "the data"
        ),
    ] = None,
    adapter: Annotated[
        Optional[dict[str, Any]],
        Field(
            description="PEFT section: {type: lora, r: 8, ...}, {type: qlora, ...}, {type: "
            "prefix_tuning, num_virtual_tokens: 16}"
        ),
    ] = None,
    dtype: Annotated[
        Optional[Literal["fp32", "bf16", "fp16"]], Field(description="weights dtype when loading")
    ] = None,
):
    """A transformers ``Auto*`` model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    if (path is None) == (config is None):
        raise ConfigError("model: give exactly one of 'path' (a local folder) or 'config'")
    auto = getattr(transformers, AUTO_CLASSES[kind])
    extra: dict[str, Any] = {}
    if kind == "sequence_classification" and info.num_classes:
        extra["num_labels"] = info.num_classes
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    torch_dtype = dtypes[dtype] if dtype is not None else None
    quantized = adapter is not None and adapter.get("type") == "qlora"
    if path is not None:
        folder = resolve_path(path)
        kwargs: dict[str, Any] = {"local_files_only": True, **extra}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        if adapter is not None and quantized:
            from src.models.adapters import quantization_config

            kwargs["quantization_config"] = quantization_config(adapter)
        try:
            model = auto.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.path: {path}: {str(exc).splitlines()[0]}") from None
    else:
        if quantized:
            raise ConfigError("model.adapter: qlora quantizes pretrained weights; give model.path")
        assert config is not None  # exactly one of path and config: checked above
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.config.model_type: required (gpt2, llama, t5, bert, ...)")
        vocab = info.extra.get("vocab_size")
        if vocab and "vocab_size" not in cfg:
            cfg["vocab_size"] = vocab
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if key in info.extra and key not in cfg:
                cfg[key] = info.extra[key]
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **cfg, **extra)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model.config: {exc}") from None
        model = auto.from_config(hf_config)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    if adapter is not None:
        from src.models.adapters import apply_adapter

        model = apply_adapter(model, adapter, kind)
    return model
