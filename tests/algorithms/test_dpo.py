"""DPO: its loss by hand, and a run on preference pairs."""

import json
import math

import pytest
import torch
from helpers import GPT, metrics, run

from src.models.losses import dpo_loss


def test_dpo_loss_by_hand():
    loss, logits = dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-2.0]),
        torch.tensor([-1.5]),
        torch.tensor([-1.5]),
        beta=0.5,
    )
    assert logits.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)))


def test_dpo_runs_on_preference_pairs(write_config, tmp_path, tokenizer_dir):
    rows = [{"prompt": f"q{i}: ", "chosen": "good answer", "rejected": "bad"} for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(
        write_config(
            {
                "data": {
                    "type": "preference",
                    "path": str(path),
                    "tokenizer": str(tokenizer_dir),
                    "batch_size": 4,
                    "val_fraction": 0.25,
                },
                "model": GPT,
                "task": {"type": "dpo", "beta": 0.5},
                "optimizer": {"type": "adamw", "lr": 1e-2},
                "trainer.max_steps": 8,
                "trainer.log_every": 4,
                "trainer.eval_every_n_steps": 8,
            }
        )
    )
    train = [r for r in metrics(tmp_path / "runs/tiny") if "train/loss" in r]
    assert train[-1]["train/loss"] < math.log(2)  # starts at log 2 (policy == reference)
    assert train[-1]["train/preference_accuracy"] > 0.5
