"""Reward functions for alignment (REWARDS registry): (prompts, completions) -> (N,) scores.

Register your own with ``@REWARDS.register("name")`` on a factory that returns the function. A
function that also takes ``answers`` gets each example's reference answer (GRPO passes it when
the data has one).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Optional

import torch
from pydantic import Field

from src.core.errors import ConfigError
from src.core.registry import REWARDS

RewardFn = Callable[[list[str], list[str]], torch.Tensor]


@REWARDS.register("contains")
def contains(
    pattern: Annotated[str, Field(description="regular expression counted in the completion")],
    ignore_case: Annotated[bool, Field(description="match regardless of case")] = True,
) -> RewardFn:
    """1 for every occurrence of the regular expression in the completion, capped at 3."""
    rx = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    return lambda prompts, completions: torch.tensor(
        [min(3.0, float(len(rx.findall(c)))) for c in completions]
    )


@REWARDS.register("length")
def length(
    target: Annotated[
        int, Field(ge=1, description="completion length in characters that scores 1")
    ] = 20,
) -> RewardFn:
    """1 - |characters - target| / target: completions close to ``target`` characters score 1."""
    return lambda prompts, completions: torch.tensor(
        [1.0 - abs(len(c) - target) / target for c in completions]
    )


@REWARDS.register("exact_answer")
def exact_answer(
    first_line: Annotated[
        bool,
        Field(description="compare only the completion's first line (what follows is ignored)"),
    ] = True,
) -> RewardFn:
    """1 where the completion, stripped of surrounding spaces, is the example's ``answer``, else
    0. Takes data whose batches carry answers (``arithmetic`` in ``prompts`` format)."""

    def score(
        prompts: list[str], completions: list[str], answers: Optional[list[str]] = None
    ) -> torch.Tensor:
        if answers is None:
            raise ConfigError(
                "reward 'exact_answer': the data gives no answers (use data with "
                "an 'answer' per prompt, e.g. arithmetic with format: prompts)"
            )
        got = [(c.split("\n", 1)[0] if first_line else c).strip() for c in completions]
        return torch.tensor([float(g == str(a).strip()) for g, a in zip(got, answers)])

    return score


@REWARDS.register("reward_model")
def reward_model(
    path: Annotated[str, Field(description="local folder of a sequence-classification model")],
    label: Annotated[int, Field(description="the class whose logit is the reward")] = 1,
    max_length: Annotated[int, Field(ge=8, description="prompt + completion tokens scored")] = 256,
    tokenizer: Annotated[
        Optional[str], Field(description="its tokenizer folder (default: the model's)")
    ] = None,
) -> RewardFn:
    """The logit of class ``label`` of a local sequence-classification model on prompt+completion."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from src.core.local_paths import resolve_path

    folder = resolve_path(path, "task.reward.path")
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(
        str(resolve_path(tokenizer, "task.reward.tokenizer")) if tokenizer else str(folder),
        local_files_only=True,
    )
    return ModelReward(model.eval(), tok, label, max_length)


class ModelReward:
    """A reward function backed by a model; ``to(device)`` moves the model (the task does it, to
    score where the policy runs)."""

    def __init__(self, model: torch.nn.Module, tok, label: int, max_length: int):
        self.model, self.tok, self.label, self.max_length = model, tok, label, max_length

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        enc = self.tok(
            [p + c for p, c in zip(prompts, completions)],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        ).to(next(self.model.parameters()).device)
        return self.model(**enc).logits[:, self.label].float()

    def to(self, device) -> ModelReward:
        self.model.to(device)
        return self
