"""GRPO: group advantages by hand, chunked completions give the one-batch gradient, the loss
variants, the zero-variance warning, an exact resume, and two DDP ranks."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import launch, metrics, params, run, same, stop_and_resume

GPT = {
    "type": "hf",
    "kind": "causal_lm",
    "config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 16},
}
DATA = {
    "type": "arithmetic",
    "format": "prompts",
    "max_operand": 9,
    "val_fraction": 0.2,
    "batch_size": 4,
}
# the length reward varies between completions of a random model, so groups have advantages
REWARDS = [{"type": "length", "target": 2}, {"type": "exact_answer", "weight": 2.0}]


def section(**task):
    return {
        "data": DATA,
        "model": GPT,
        "task": {
            "type": "grpo",
            "rewards": REWARDS,
            "num_generations": 4,
            "max_new_tokens": 4,
            **task,
        },
        "trainer.max_steps": 4,
        "trainer.log_every": 1,
        "trainer.eval_every_n_steps": 4,
    }


def test_group_advantages_by_hand():
    from src.algorithms.grpo import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 1.0])
    adv, std = group_advantages(rewards, 4, scale=False)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 2.0, -1.0, -1.0, 0.0]
    s1 = math.sqrt(4 * 0.25 / 3)  # unbiased standard deviation of 1, 0, 0, 1
    s3 = math.sqrt((4 + 1 + 1 + 0) / 3)
    assert std.tolist() == pytest.approx([s1, 0.0, s3])
    adv, _ = group_advantages(rewards, 4, scale=True)
    want = (
        [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4)] * 1
        + [-0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4)]
        + [0.0] * 4
        + [2 / (s3 + 1e-4), -1 / (s3 + 1e-4), -1 / (s3 + 1e-4), 0.0]
    )
    assert adv.tolist() == pytest.approx(want, rel=1e-6)


def test_exact_answer_reward():
    from src.algorithms.rewards import exact_answer

    score = exact_answer()
    got = score(["1+2="] * 4, ["3", " 3\nmore", "33", ""], ["3", "3", "3", "3"])
    assert got.tolist() == [1.0, 1.0, 0.0, 0.0]


def _task(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    from src.algorithms.grpo import GRPO
    from src.core.dataset_info import DatasetInfo
    from src.data.arithmetic import char_tokenizer
    from src.data.text import token_info

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_layer=1,
            n_head=2,
            n_embd=32,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    task = GRPO(model, rewards=REWARDS, max_new_tokens=4, **kw)
    task.configure(DatasetInfo(num_samples=1, extra=token_info(tok)))
    return task


def _prompts(n: int):
    from src.data.arithmetic import arithmetic

    dm = arithmetic(seed=0, format="prompts", max_operand=9)
    return dm.train.collate_fn([dm.train[i] for i in range(n)])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_give_the_gradient_of_one_batch(loss_type):
    """G=16 completions of 2 prompts, forward and backward 4 at a time, give the loss and the
    gradient of all 32 at once (the same completions: sampled with the same generator)."""
    grads, losses = [], []
    for micro in (None, 4):
        task = _task(
            num_generations=16,
            micro_batch=micro,
            generation_batch=32,
            loss_type=loss_type,
            beta=0.04,
            num_iterations=2,
        )
        torch.manual_seed(1)
        chunks = task.split(_prompts(2))
        assert len(chunks) == (1 if micro is None else 8)
        task.model.zero_grad()
        total = 0.0
        for c in chunks:  # as the trainer does: each chunk alone, losses added
            out = task.training_step(c)
            out["loss"].backward()
            total += float(out["loss"].detach())
        assert float(chunks[0].metrics["reward_std"]) > 0  # there is something to learn
        losses.append(total)
        grads.append(torch.cat([p.grad.flatten() for p in task.model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    assert torch.allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_generation_in_micro_batches_keeps_every_completion():
    """G is not bound to the batch: 3 prompts x 8 completions, generated 5 at a time."""
    task = _task(num_generations=8, micro_batch=6, generation_batch=5)
    torch.manual_seed(0)
    chunks = task.split(_prompts(3))
    assert [len(c.seq) for c in chunks] == [6, 6, 6, 6]
    prompt_len = chunks[0].prompt_len
    for c in chunks:
        assert c.seq.shape[1] == c.mask.shape[1] == prompt_len + c.response_mask.shape[1]
        # the response mask ends at the first EOS (included) and never restarts
        r = c.response_mask
        assert (r[:, 1:] <= r[:, :-1]).all()


def test_groups_without_reward_variance_are_counted_and_warned(recwarn):
    from src.algorithms.grpo import GRPO

    task = _task(num_generations=4)
    task.reward_fns = [("const", 1.0, lambda p, c: torch.ones(len(c)), False)]
    task.reward_names = ["const"]
    chunks = GRPO.split(task, _prompts(2))
    assert float(chunks[0].metrics["frac_reward_zero_std"]) == 1.0
    assert float(task.training_step(chunks[0])["loss"]) == 0.0
    assert any("frac_reward_zero_std" in str(w.message) for w in recwarn.list)


def test_grpo_trains_and_evaluates(write_config, tmp_path):
    run(write_config(section(micro_batch=8)))
    rows = metrics(tmp_path / "runs/tiny")
    train = [r for r in rows if "train/reward" in r]
    assert len(train) == 4 and all(math.isfinite(r["train/loss"]) for r in train)
    for key in (
        "train/reward/length",
        "train/reward/exact_answer",
        "train/frac_reward_zero_std",
        "train/completion_length",
        "train/clip_ratio",
    ):
        assert key in train[-1]
    val = [r for r in rows if "val/reward" in r][-1]
    assert 0 <= val["val/reward/exact_answer"] <= 1


@pytest.mark.parametrize("mu", [1, 3])
def test_every_prompt_of_an_epoch_is_trained_on_num_iterations_times(write_config, monkeypatch, mu):
    """A rollout serves mu steps, and those steps are given its batch: over one epoch each
    training prompt is trained on exactly mu times, the epoch has batches x mu steps, and
    samples/s counts each prompt once."""
    from collections import Counter

    from src.algorithms.grpo import GRPO
    from src.core.interval import IntervalMetrics, batch_size_of

    steps, current, counted = [], [], []  # per step: the prompts its completions answer
    real_train, real_end, real_add = GRPO.training_step, GRPO.on_step_end, IntervalMetrics.add_batch

    def train(self, chunk):
        prompts = self.tokenizer.batch_decode(
            chunk.seq[:, : chunk.prompt_len], skip_special_tokens=True
        )
        current.extend(prompts[:: self.g])  # one per group of G completions
        return real_train(self, chunk)

    def step_end(self, *args):
        steps.append(list(current))
        current.clear()
        return real_end(self, *args)

    monkeypatch.setattr(GRPO, "training_step", train)
    monkeypatch.setattr(GRPO, "on_step_end", step_end)
    monkeypatch.setattr(
        IntervalMetrics,
        "add_batch",
        lambda self, b: (counted.append(batch_size_of(b)), real_add(self, b))[1],
    )
    data = {**DATA, "train_size": 12, "batch_size": 4}
    exp = run(
        write_config(
            {
                **section(num_iterations=mu),
                "data": data,
                "trainer.max_steps": None,
                "trainer.max_epochs": 1,
                "trainer.eval_every_n_steps": None,
            }
        )
    )
    assert len(steps) == exp.derived["total_steps"] == 3 * mu and exp.trainer.epoch == 1
    train_prompts = [
        exp.task.tokenizer.decode(exp.data.train[i]["input_ids"], skip_special_tokens=True)
        for i in range(len(exp.data.train))
    ]
    assert Counter(p for step in steps for p in step) == Counter({p: mu for p in train_prompts})
    for k in range(0, len(steps), mu):  # the steps of one rollout train on its batch alone
        assert all(sorted(steps[j]) == sorted(steps[k]) for j in range(k, k + mu))
    assert sum(counted) == 12


def test_grpo_resumes_exactly(write_config, tmp_path):
    """A stop after step 3 of 6, with completions reused for 2 steps (num_iterations): the
    reused completions are restored, so 6 straight == 3 + resume."""
    sec = {
        **section(micro_batch=8, num_iterations=2, beta=0.04),
        "trainer.max_steps": 6,
        "trainer.eval_every_n_steps": None,
        "checkpoint.every_n_steps": 10,
    }
    straight, resumed, a, b = stop_and_resume(write_config, tmp_path / "runs", sec, 3)
    assert same(params(straight), params(resumed))
    assert a == b and len(a) == 3


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grpo_on_two_ranks(write_config, tmp_path, strategy):
    """Each rank answers its own prompts, with the token-level (dapo) normaliser shared between
    them; the run trains, evaluates on both ranks' shares and saves. Under FSDP the answers are
    made outside the step's forward, with the sharded weights gathered for it."""
    cfg = write_config(
        {
            **section(micro_batch=8, loss_type="dapo", beta=0.04),
            "strategy": {"type": strategy},
            "checkpoint.save_last": True,
        }
    )
    launch(2, cfg)
    rows = [json.loads(x) for x in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/reward" in r]
    assert len(train) == 4 and all(math.isfinite(r["train/loss"]) for r in train)
    assert 0 <= [r for r in rows if "val/reward" in r][-1]["val/reward/exact_answer"] <= 1
    assert list((tmp_path / "runs/tiny/checkpoints").glob("step_00000004"))


def test_left_padded_completions_are_scored_as_they_were_sampled():
    """generate counts positions from each prompt's first real token; the loss's forward must
    too (else a shorter, left-padded prompt is scored as a shifted sequence)."""
    from src.algorithms.ppo import PPO

    task = _task(num_generations=2)
    seq = torch.tensor([[3, 12, 4, 15, 5, 0]])  # "1+2=3" EOS, unpadded
    padded = torch.cat([torch.ones(1, 2, dtype=torch.long), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(seq)], dim=1)
    with torch.no_grad():
        alone = task._logps(task.model, seq, torch.ones_like(seq), 4)
        left = task._logps(task.model, padded, mask, 6)
        ppo = SimpleNamespace(value_head=torch.nn.Linear(32, 1))
        ppo_logits, _ = PPO._forward(ppo, task.model, padded, mask, True)
    assert torch.allclose(alone, left, atol=1e-5)
    assert torch.allclose(ppo_logits[:, 2:], task.model(seq).logits, atol=1e-5)


def test_prompts_jsonl_with_answers_feeds_exact_answer(write_config, tmp_path):
    from src.data.arithmetic import char_tokenizer

    char_tokenizer().save_pretrained(str(tmp_path / "tok"))
    lines = [
        json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)})
        for a in range(4)
        for b in range(4)
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    run(
        write_config(
            {
                **section(),
                "data": {
                    "type": "prompts",
                    "path": str(tmp_path / "p.jsonl"),
                    "tokenizer": str(tmp_path / "tok"),
                    "batch_size": 4,
                    "val_fraction": 0.25,
                },
                "trainer.max_steps": 2,
                "trainer.eval_every_n_steps": 2,
            }
        )
    )
    rows = metrics(tmp_path / "runs/tiny")
    assert 0 <= [r for r in rows if "val/reward" in r][-1]["val/reward/exact_answer"] <= 1
    assert "train/reward/exact_answer" in [r for r in rows if "train/reward" in r][-1]


def test_rollout_reuse_with_accumulation_is_one_line(write_config):
    from src.core.errors import ConfigError
    from src.run.experiment import build, prepare

    cfg, origins = prepare(
        str(write_config({**section(num_iterations=2), "trainer.grad_accum_steps": 2}))
    )
    with pytest.raises(
        ConfigError,
        match=r"^trainer.grad_accum_steps: 2 with task 'grpo', whose "
        r"rollouts serve 2 steps each",
    ):
        build(cfg, origins)
