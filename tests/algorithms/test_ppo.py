"""PPO: GAE by hand, the adaptive KL controller, rollouts, an exact resume mid-rollout."""

import math

import pytest
import torch
from helpers import metrics, params, run, same


def test_gae_by_hand():
    from src.algorithms.ppo import gae

    mask = torch.ones(1, 3)
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), mask, 1.0, 1.0)
    assert adv.tolist() == [[1.0, 1.0, 1.0]] and ret.tolist() == [[1.0, 1.0, 1.0]]
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), mask, 1.0, 1.0)
    assert adv.tolist() == [[0.5, 0.5, 0.5]] and ret.tolist() == [[1.0, 1.0, 1.0]]
    # gamma discounts the future; a masked tail contributes nothing
    adv, _ = gae(
        torch.tensor([[0.0, 1.0, 5.0]]),
        torch.zeros(1, 3),
        torch.tensor([[1.0, 1.0, 0.0]]),
        0.5,
        1.0,
    )
    assert adv.tolist() == [[0.5, 1.0, 0.0]]


@pytest.fixture()
def ppo_section(tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from src.data.text import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=128)
    ).save_pretrained(str(tokenizer_dir))
    return {
        "data": {
            "type": "prompts",
            "tokenizer": str(tokenizer_dir),
            "stdlib_functions": True,
            "limit": 24,
            "batch_size": 4,
            "val_fraction": 0.2,
        },
        "model": {"type": "hf", "kind": "causal_lm", "path": str(tokenizer_dir)},
        "task": {
            "type": "ppo",
            "reward": {"type": "contains", "pattern": "e"},
            "max_new_tokens": 8,
            "ppo_epochs": 2,
        },
        "trainer.max_steps": 4,
        "trainer.log_every": 2,
        "trainer.eval_every_n_steps": 4,
    }


def test_ppo_collects_rollouts_and_updates(write_config, tmp_path, ppo_section):
    run(write_config(ppo_section))
    rows = metrics(tmp_path / "runs/tiny")
    train = [r for r in rows if "train/reward" in r]
    assert len(train) == 2 and all(math.isfinite(r["train/loss"]) for r in train)
    assert train[-1]["train/response_length"] > 0
    assert "val/reward" in [r for r in rows if "val/kl" in r][-1]


def test_adaptive_kl_controller_moves_toward_its_target():
    from src.algorithms.ppo import PPO

    task = PPO.__new__(PPO)
    task.kl_coef, task.kl_target, task.kl_horizon = 0.1, 4.0, 100.0
    task.adapt_kl(40.0, 10)  # far above target: the error is clipped to +0.2
    assert task.kl_coef == pytest.approx(0.1 * 1.02)
    task.adapt_kl(3.0, 10)  # 25% below: -0.2 after clipping
    assert task.kl_coef == pytest.approx(0.1 * 1.02 * 0.98)
    task.adapt_kl(4.4, 50)  # 10% above, half a horizon
    assert task.kl_coef == pytest.approx(0.1 * 1.02 * 0.98 * 1.05)
    task.kl_target = None
    task.adapt_kl(100.0, 100)
    assert task.kl_coef == pytest.approx(0.1 * 1.02 * 0.98 * 1.05)


def test_ppo_resumes_mid_rollout_exactly(write_config, tmp_path, ppo_section):
    """A stop after step 3 falls inside the second rollout (2 steps each): the rollout, the
    adaptive KL coefficient and the value head are restored, so 6 straight == 3 + resume."""
    section = {
        **ppo_section,
        "trainer.max_steps": 6,
        "trainer.log_every": 1,
        "trainer.eval_every_n_steps": None,
        "checkpoint.every_n_steps": 10,
        "task": {**ppo_section["task"], "kl_target": 1.0, "kl_horizon": 20},
    }
    straight = run(write_config({**section, "name": "a"}))
    cfg = write_config(
        {**section, "name": "b", "callbacks": [{"type": "signal_at_step", "step": 3}]}
    )
    with pytest.raises(SystemExit):
        run(cfg)
    resumed = run(cfg, "callbacks=[]")
    assert same(params(straight), params(resumed))
    assert straight.task.kl_coef == resumed.task.kl_coef != 0.05
    a = [r for r in metrics(tmp_path / "runs/a") if r["step"] > 3]
    b = [r for r in metrics(tmp_path / "runs/b") if r["step"] > 3]
    assert a == b and len(a) == 3


def test_every_prompt_of_an_epoch_is_trained_on_ppo_epochs_times(
    write_config, ppo_section, monkeypatch
):
    """Each rollout's ppo_epochs steps are given its batch: over one epoch every training
    prompt is sampled once and trained on exactly ppo_epochs times."""
    from collections import Counter

    from src.algorithms.ppo import PPO

    trained, given = [], []
    real = PPO.training_step

    def step(self, batch):
        out = real(self, batch)
        r = self._rollout
        trained.append(
            self.tokenizer.batch_decode(r.seq[:, : r.prompt_len], skip_special_tokens=True)
        )
        given.append(self.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True))
        return out

    monkeypatch.setattr(PPO, "training_step", step)
    exp = run(
        write_config(
            {
                **ppo_section,
                "trainer.max_steps": None,
                "trainer.max_epochs": 1,
                "trainer.eval_every_n_steps": None,
            }
        )
    )
    batches = exp.train_loader.batches_per_epoch()
    assert len(trained) == exp.derived["total_steps"] == 2 * batches
    assert trained == given  # the rollout trained on is the batch the step was given
    n = batches * 4  # drop_last: the epoch's prompts
    assert sum(Counter(p for t in trained for p in t).values()) == 2 * n
    assert all(c % 2 == 0 for c in Counter(p for t in trained for p in t).values())
