"""Masked language modelling (and seq2seq, trained from the same kind of config)."""

import json
import math

import pytest
import torch
from helpers import metrics, run

from src.data.text import resolve_files, train_tokenizer


def test_masking_chooses_about_15_percent_and_never_special_tokens(write_config):
    from src.algorithms.masked_lm import MaskedLM
    from src.core.dataset_info import DatasetInfo

    task = MaskedLM(torch.nn.Identity(), mask_prob=0.15)
    task.configure(DatasetInfo(num_samples=1, extra={"mask_token_id": 2, "vocab_size": 50}))
    task.special = [0, 1, 2]
    torch.manual_seed(0)
    ids = torch.randint(3, 50, (64, 64))
    ids[:, 0] = 0  # a special token at every start
    masked, labels = task.mask(ids)
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.02
    assert not chosen[:, 0].any()
    assert torch.equal(labels[chosen], ids[chosen])
    became_mask = (masked == 2) & chosen
    assert abs(became_mask.sum().item() / chosen.sum().item() - 0.8) < 0.05


def test_masked_lm_and_seq2seq_train_from_config(write_config, tmp_path):
    run(
        write_config(
            {
                "name": "mlm",
                "data": {
                    "type": "text",
                    "paths": ["stdlib:json"],
                    "vocab_size": 400,
                    "block_size": 32,
                    "val_fraction": 0.3,
                    "batch_size": 8,
                },
                "model": {
                    "type": "hf",
                    "kind": "masked_lm",
                    "config": {
                        "model_type": "bert",
                        "hidden_size": 32,
                        "num_hidden_layers": 1,
                        "num_attention_heads": 2,
                        "intermediate_size": 64,
                        "max_position_embeddings": 64,
                    },
                },
                "task": {"type": "masked_lm"},
                "trainer.max_steps": 3,
                "trainer.eval_every_n_steps": 3,
            }
        )
    )
    val = [r for r in metrics(tmp_path / "runs/mlm") if "val/loss" in r][-1]
    assert val["val/loss"] > 0 and 0 <= val["val/masked_accuracy"] <= 1

    tok = train_tokenizer(resolve_files(["stdlib:json"]), 400)
    tok.save_pretrained(str(tmp_path / "tok"))
    rows = [
        {"source": f"reverse: {a} {b}", "target": f"{b} {a}"}
        for a, b in [("one", "two"), ("red", "blue"), ("up", "down")] * 4
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(
        write_config(
            {
                "name": "t5",
                "data": {
                    "type": "pairs",
                    "path": str(tmp_path / "pairs.jsonl"),
                    "tokenizer": str(tmp_path / "tok"),
                    "batch_size": 4,
                    "val_fraction": 0.25,
                },
                "model": {
                    "type": "hf",
                    "kind": "seq2seq",
                    "config": {
                        "model_type": "t5",
                        "d_model": 32,
                        "d_ff": 64,
                        "num_layers": 1,
                        "num_heads": 2,
                        "d_kv": 16,
                    },
                },
                "task": {"type": "seq2seq"},
                "trainer.max_steps": 3,
                "trainer.eval_every_n_steps": 3,
            }
        )
    )
    val = [r for r in metrics(tmp_path / "runs/t5") if "val/loss" in r][-1]
    assert val["val/perplexity"] == pytest.approx(math.exp(val["val/loss"]), rel=1e-4)
