"""Tokenised examples: the prompt masked out of the labels, padding into batches."""

import pytest
import torch

from src.data.examples import PadCollator
from src.data.jsonl import encode_pair


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


def _direct(tok, fmt: str, row: dict, max_length: int) -> dict:
    """One example tokenized on its own, as the platform did before examples had a store."""
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tok.eos_token_id]
    if fmt == "alpaca":
        from src.data.jsonl import prompt_and_answer

        return encode_pair(tok, *prompt_and_answer(row, "alpaca", tok, "x"), max_length, True)
    if fmt == "labelled":
        y = row["label"]
        got = tok(row["text"], truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": torch.tensor(got), "labels": torch.tensor(y)}
    if fmt == "preference":
        c = encode_pair(tok, row["prompt"], row["chosen"], max_length, True)
        r = encode_pair(tok, row["prompt"], row["rejected"], max_length, True)
        return {
            "chosen_input_ids": c["input_ids"],
            "chosen_labels": c["labels"],
            "rejected_input_ids": r["input_ids"],
            "rejected_labels": r["labels"],
        }
    if fmt == "pairs":
        return {
            "input_ids": torch.tensor(ids(row["source"])[: max_length - 1] + eos),
            "labels": torch.tensor(ids(row["target"])[: max_length - 1] + eos),
        }
    return {"input_ids": torch.tensor(ids(row["prompt"])[-max_length:]), "answer": row["answer"]}


@pytest.mark.parametrize("fmt", ["alpaca", "labelled", "preference", "pairs", "prompts"])
def test_examples_read_from_their_token_store_are_the_directly_tokenized_ones(
    tmp_path, tokenizer_dir, fmt
):
    """Each JSONL format is tokenized once into a token store and read back as the examples the
    tokenizer gives one by one (cuts at max_length, the prompt's mask, EOS); a second load reads
    the store; an edited file builds a new one."""
    import json
    import random

    from src.data import jsonl
    from src.data.text import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    rng = random.Random(0)
    words = "def return import class self json value key dumps loads for in".split()
    text = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))  # noqa: E731
    rows = {
        "alpaca": lambda i: {"instruction": text(), "output": text()},
        "labelled": lambda i: {"text": text(), "label": i % 3},
        "preference": lambda i: {"prompt": text(), "chosen": text(), "rejected": text()},
        "pairs": lambda i: {"source": text(), "target": text()},
        "prompts": lambda i: {"prompt": text(), "answer": str(i)},
    }[fmt]
    data = [rows(i) for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    build = {
        "alpaca": jsonl.instructions,
        "labelled": jsonl.labelled_text,
        "preference": jsonl.preference,
        "pairs": jsonl.pairs,
        "prompts": jsonl.prompts,
    }[fmt]
    kw = dict(seed=0, path=str(path), tokenizer=str(tokenizer_dir), max_length=24)
    kw["cache_dir"] = str(tmp_path / "cache")
    first = build(**kw)
    assert first.info.extra["token_stores"][0]["built_seconds"] is not None
    second = build(**kw)
    fact = second.info.extra["token_stores"][0]
    assert fact["built_seconds"] is None
    assert fact["path"] == first.info.extra["token_stores"][0]["path"]
    got = [second.train[i] for i in range(len(second.train))]
    got += [second.val[i] for i in range(len(second.val))] if second.val is not None else []
    n_val = len(second.val) if second.val is not None else 0
    order = jsonl.split_rows(len(data), n_val / len(data), 0)
    want = [_direct(tok, fmt, data[i], 24) for i in order[0] + order[1]]
    assert len(got) == len(want) == len(data)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], torch.Tensor):
                assert torch.equal(g[k], w[k]), (k, g[k], w[k])
            else:
                assert g[k] == w[k]
    assert any(len(w.get("input_ids", w.get("chosen_input_ids"))) >= 23 for w in want)  # cuts
    data[0] = rows(99)
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    third = build(**kw)
    assert third.info.extra["token_stores"][0]["path"] != fact["path"]
