"""Tokenised examples: the prompt masked out of the labels, padding into batches."""

import torch

from src.data.jsonl import PadCollator, encode_pair


def test_prompt_is_masked_out_of_the_labels(tokenizer_dir):
    from src.data.text import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    item = encode_pair(tok, "### Instruction:\nsay hi\n\n### Response:\n", "hi there", 64, True)
    n_prompt = len(
        tok("### Instruction:\nsay hi\n\n### Response:\n", add_special_tokens=False)["input_ids"]
    )
    labels = item["labels"].tolist()
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == item["input_ids"].tolist()[n_prompt:]
    assert labels[-1] == tok.eos_token_id


def test_padding_collator():
    rows = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
    ]
    batch = PadCollator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
