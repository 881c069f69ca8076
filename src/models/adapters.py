"""PEFT adapters from the model's ``adapter:`` section: LoRA, QLoRA (4-bit base weights through
bitsandbytes) and prefix tuning. Only the adapter's parameters train."""

from __future__ import annotations

import copy
from typing import Any

from src.core.errors import ConfigError

TASK_TYPES = {
    "causal_lm": "CAUSAL_LM",
    "seq2seq": "SEQ_2_SEQ_LM",
    "masked_lm": None,
    "sequence_classification": "SEQ_CLS",
    "base": "FEATURE_EXTRACTION",
}
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "bias", "modules_to_save"}


def quantization_config(section: dict[str, Any]):
    """4-bit NF4 weights with double quantisation; computation in ``compute_dtype``."""
    import torch
    from transformers import BitsAndBytesConfig

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        section.get("compute_dtype", "fp32")
    ]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=section.get("double_quant", True),
        bnb_4bit_compute_dtype=dtype,
    )


def apply_adapter(model, section: dict[str, Any], kind: str):
    """Wrap ``model`` in a PeftModel as ``section`` says.

    Sections: ``{type: lora, r: 8, alpha: 16, dropout: 0.05, target_modules: [q, v]}``;
    ``{type: qlora, ...the same, compute_dtype: bf16}``; ``{type: prefix_tuning,
    num_virtual_tokens: 16}``.
    """
    from peft import (
        LoraConfig,
        PeftConfig,
        PrefixTuningConfig,
        get_peft_model,
        prepare_model_for_kbit_training,
    )

    cfg: PeftConfig

    section = dict(section)
    kind_name = section.pop("type", None)
    task_type = TASK_TYPES[kind]
    if kind_name in ("lora", "qlora"):
        if kind_name == "qlora":
            for key in ("compute_dtype", "quant_type", "double_quant"):
                section.pop(key, None)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        unknown = set(section) - LORA_KEYS
        if unknown:
            raise ConfigError(
                f"model.adapter: unknown LoRA keys {sorted(unknown)} (allowed: {sorted(LORA_KEYS)})"
            )
        section = copy.deepcopy(section)  # PEFT extends modules_to_save in place: not the config's
        cfg = LoraConfig(
            r=section.get("r", 8),
            lora_alpha=section.get("alpha", 16),
            lora_dropout=section.get("dropout", 0.0),
            target_modules=section.get("target_modules", "all-linear"),
            bias=section.get("bias", "none"),
            modules_to_save=section.get("modules_to_save"),
            task_type=task_type,
        )
    elif kind_name == "prefix_tuning":
        unknown = set(section) - {"num_virtual_tokens"}
        if unknown:
            raise ConfigError(f"model.adapter: unknown prefix-tuning keys {sorted(unknown)}")
        cfg = PrefixTuningConfig(
            num_virtual_tokens=section.get("num_virtual_tokens", 16), task_type=task_type
        )
    else:
        raise ConfigError(f"model.adapter.type: '{kind_name}' is not lora, qlora or prefix_tuning")
    try:
        return get_peft_model(model, cfg)
    except ValueError as exc:
        raise ConfigError(f"model.adapter: {str(exc).splitlines()[0]}") from None
