"""Tokenised examples: the prompt masked out of the labels, padding into batches."""

import pytest
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


def _long_tailed_jsonl(path, n=60, seed=0):
    """Instructions whose answers have a long-tailed length (most short, a few long)."""
    import json
    import random

    rng = random.Random(seed)
    words = "the of a to in is that for it as was with be by on not he this are or".split()
    lines = []
    for i in range(n):
        k = int(rng.paretovariate(1.2) * 3)
        answer = " ".join(rng.choice(words) for _ in range(min(k, 60)))
        lines.append(json.dumps({"instruction": f"Say {i} words.", "output": answer}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_packed_examples_have_the_unpacked_loss(tmp_path, tokenizer_dir, mask_prompt):
    """The same examples packed into blocks and padded one per row: the same sum of token
    losses and the same number of predicted tokens (rel 1e-5), every token once, positions
    restarting at each example."""
    from src.algorithms.causal_lm import token_loss_sums
    from src.core.dataset_info import DatasetInfo
    from src.data.jsonl import instructions
    from src.models.hf import hf_model as hf

    path = _long_tailed_jsonl(tmp_path / "sft.jsonl")
    kw = dict(max_length=256, mask_prompt=mask_prompt, val_fraction=0.0)
    plain = instructions(0, str(path), str(tokenizer_dir), **kw)
    packed = instructions(0, str(path), str(tokenizer_dir), packing=True, **kw)
    assert len(packed.train) < len(plain.train) / 2  # packing saves most of the padding
    assert sum(int(b["num_tokens"]) for b in packed.train.items) == sum(plain.train.lengths)
    for b in packed.train.items:
        starts = torch.nonzero(b["position_ids"] == 0).flatten()
        assert torch.equal(b["segments"][starts], torch.arange(len(starts)))
    info = DatasetInfo(num_samples=1, input_shape=(256,), extra=plain.info.extra)
    gpt = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 256}
    torch.manual_seed(0)
    model = hf(info=info, kind="causal_lm", config=gpt).eval()

    def total(dm, batch):
        nll = n = 0
        for i in range(0, len(dm.train), batch):
            b = dm.train.collate_fn([dm.train[j] for j in range(i, min(i + batch, len(dm.train)))])
            kw = {k: b[k] for k in ("attention_mask", "position_ids") if k in b}
            with torch.no_grad():
                s, c = token_loss_sums(model(input_ids=b["input_ids"], **kw).logits, b["labels"])
            nll, n = nll + float(s), n + int(c)
        return nll, n

    (a, na), (b, nb) = total(plain, 8), total(packed, 4)
    assert na == nb and abs(a - b) <= 1e-5 * abs(a), (a, b, na, nb)


def test_a_packed_run_trains_and_counts_real_tokens(write_config, tmp_path, tokenizer_dir):
    from helpers import GPT, metrics, run

    path = _long_tailed_jsonl(tmp_path / "sft.jsonl")
    data = {"type": "instructions", "path": str(path), "tokenizer": str(tokenizer_dir),
            "max_length": 64, "packing": True, "batch_size": 4}  # fmt: skip
    exp = run(write_config({"data": data, "model": GPT, "task": {"type": "causal_lm",
              "samples": 0}, "trainer.max_steps": 3, "trainer.log_every": 1}))  # fmt: skip
    rows = [r for r in metrics(tmp_path / "runs/tiny", drop=()) if "train/loss" in r]
    assert len(rows) == 3 and all(r["train/loss"] > 0 for r in rows)
    from src.core.interval import IntervalMetrics

    meter = IntervalMetrics()
    n = len(exp.data.train)
    blocks = [exp.data.train[i] for i in range(n - 4, n)]  # the last blocks are not full
    meter.add_batch(exp.data.train.collate_fn(blocks))
    real = sum(int(b["num_tokens"]) for b in blocks)
    assert int(meter.tokens) == real < 4 * 64  # tokens/s counts real tokens, not padding
