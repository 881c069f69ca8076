"""PEFT adapters on transformers models: LoRA round trip, prefix tuning, QLoRA."""

import pytest
import torch
from helpers import GPT, LM_DATA, run


def test_lora_adapter_round_trip_through_peft(write_config, tmp_path):
    """Adapter-only checkpoints load with PeftModel.from_pretrained onto the same base."""
    from peft import PeftModel

    from src.run.experiment import build, prepare

    changes = {**LM_DATA, "trainer.max_steps": 3, "checkpoint.every_n_steps": 3}
    trained = run(write_config(changes))
    adapter = tmp_path / "runs/tiny/checkpoints/step_00000003/adapter"
    assert (adapter / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").exists()
    d = trained.derived
    assert 0 < d["trainable_parameters"] < d["model_parameters"] / 5

    cfg, o = prepare(str(write_config({**changes, "model": GPT}, "base.yaml")))
    base = build(cfg, o).task.model  # the same seed builds the same base weights
    loaded = PeftModel.from_pretrained(base, str(adapter))
    ids = torch.randint(0, 300, (2, 16))
    trained.task.model.eval()
    loaded.eval()
    torch.testing.assert_close(
        loaded(input_ids=ids).logits, trained.task.model(input_ids=ids).logits
    )

    from transformers import AutoModelForCausalLM

    from src.run.export import export_hf

    out = tmp_path / "merged"
    export_hf(str(write_config(changes)), [], adapter.parent, out)
    merged = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    torch.testing.assert_close(
        merged(input_ids=ids).logits, trained.task.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4
    )


def test_prefix_tuning_and_qlora_forward_backward(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import GPT2Config, GPT2LMHeadModel

    from src.core.dataset_info import DatasetInfo
    from src.models.hf import hf_model

    folder = tmp_path / "gpt"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=100, n_layer=1, n_head=2, n_embd=64, n_positions=32)
    ).save_pretrained(str(folder))
    info = DatasetInfo(num_samples=1)
    ids = torch.randint(0, 100, (2, 12))
    for adapter in (
        {"type": "qlora", "r": 4, "target_modules": ["c_attn"]},
        {"type": "prefix_tuning", "num_virtual_tokens": 4},
    ):
        model = hf_model(info, kind="causal_lm", path=str(folder), adapter=adapter)
        if adapter["type"] == "qlora":
            import bitsandbytes as bnb

            assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None for p in trainable)
        assert sum(p.numel() for p in trainable) < sum(p.numel() for p in model.parameters()) / 4
