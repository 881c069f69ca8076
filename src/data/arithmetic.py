"""Arithmetic problems for language models, made in memory: ``"12+7="`` -> ``"19"``.

Every problem ``a <op> b`` with operands in ``0..max_operand`` is made once; a fixed seed
(``split_seed``, not the run's) holds out the same problems for every config that reads them, so a
supervised run and the reinforcement learning that follows it are scored on the same unseen
problems. Two formats:

- ``sft``: ``input_ids`` = problem + answer + EOS, ``labels`` = the answer and EOS only (the
  ``causal_lm`` task learns to answer, not to pose problems);
- ``prompts``: left-padded problems with their ``answer`` strings (``grpo``, ``ppo``, the
  ``exact_answer`` reward).

Without ``tokenizer`` the text is read character by character (``char_tokenizer``): a 17-symbol
vocabulary, saved with the run and exported with the model like any tokenizer.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from src.core.dataset_info import DataModule, DatasetInfo
from src.core.errors import ConfigError
from src.core.registry import DATASETS
from src.data.examples import Examples, LeftPadCollator, PadCollator, ValFraction
from src.data.text import EOS, PAD, load_tokenizer, token_info

CHARS = "0123456789+-*= \n"
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def char_tokenizer():
    """A transformers fast tokenizer with one token per character of ``CHARS`` (and EOS, PAD)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, PAD: 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()  # characters back to text without spaces between them
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=EOS
    )


def problems(
    max_operand: int, operations: list[str], split_seed: int, val_fraction: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val) lists of (problem, answer), e.g. ("12+7=", "19")."""
    every = [
        (f"{a}{op}{b}=", str(OPERATIONS[op](a, b)))
        for op in operations
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]
    order = np.random.default_rng(split_seed).permutation(len(every))
    n_val = int(round(val_fraction * len(every)))
    return [every[i] for i in order[n_val:]], [every[i] for i in order[:n_val]]


@DATASETS.register("arithmetic")
def arithmetic(
    seed: int,
    format: Annotated[
        Literal["sft", "prompts"],
        Field(
            description="sft: problem and answer, the answer learned; prompts: the problem alone "
            "with its answer for rewards"
        ),
    ] = "sft",
    max_operand: Annotated[
        int, Field(ge=1, le=999, description="operands run from 0 to this")
    ] = 99,
    operations: Annotated[
        list[Literal["+", "-", "*"]],
        Field(min_length=1, description="operators, each with every pair of operands"),
    ] = ["+"],
    val_fraction: ValFraction = 0.1,
    split_seed: Annotated[
        int, Field(ge=0, description="seed of the held-out problems (the same for every config)")
    ] = 0,
    train_size: Annotated[
        Optional[Annotated[int, Field(ge=1)]],
        Field(description="use only this many training problems (the held-out ones stay the same)"),
    ] = None,
    tokenizer: Annotated[
        Optional[str],
        Field(description="a local tokenizer folder (default: one token per character)"),
    ] = None,
) -> DataModule:
    """``a+b=`` problems: answers to learn (``sft``) or to be rewarded for (``prompts``)."""
    tok = load_tokenizer(tokenizer) if tokenizer else char_tokenizer()
    train, val = problems(max_operand, list(dict.fromkeys(operations)), split_seed, val_fraction)
    if train_size is not None:
        train = train[:train_size]
    if not val:
        raise ConfigError("data.val_fraction: holds out no problem; give a larger fraction")

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    if format == "sft":

        def item(problem: str, answer: str) -> dict:
            p, a = encode(problem), encode(answer) + [tok.eos_token_id]
            return {"input_ids": torch.tensor(p + a), "labels": torch.tensor([-100] * len(p) + a)}

        collate: PadCollator | LeftPadCollator = PadCollator(tok.pad_token_id)
    else:

        def item(problem: str, answer: str) -> dict:
            return {"input_ids": torch.tensor(encode(problem)), "answer": answer}

        collate = LeftPadCollator(tok.pad_token_id)
    sets = [Examples([item(*pa) for pa in part]) for part in (train, val)]
    for s in sets:
        s.collate_fn = collate
    longest = max(max(s.lengths) for s in sets)
    return DataModule(
        sets[0],
        sets[1],
        DatasetInfo(num_samples=len(sets[0]), input_shape=(longest,), extra=token_info(tok)),
    )
