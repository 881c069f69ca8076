"""The arithmetic problems: one held-out set for every format, answers only in the loss."""

import torch

from src.data.arithmetic import arithmetic, char_tokenizer


def test_held_out_problems_are_the_same_in_both_formats_and_never_trained_on():
    sft = arithmetic(seed=0, format="sft", max_operand=20, train_size=50)
    prompts = arithmetic(seed=7, format="prompts", max_operand=20)
    tok = char_tokenizer()

    def problem(item):
        ids = item["input_ids"] if "answer" in item else item["input_ids"][item["labels"] == -100]
        return tok.decode(ids)

    val_sft = {problem(x) for x in sft.val.items}
    val_prompts = {problem(x) for x in prompts.val.items}
    train = {problem(x) for x in prompts.train.items}
    assert val_sft == val_prompts and len(val_sft) == round(0.1 * 21 * 21)
    assert not val_sft & train and len(val_sft | train) == 21 * 21
    assert len(sft.train) == 50


def test_sft_items_learn_only_the_answer_and_prompts_carry_it():
    tok = char_tokenizer()
    item = arithmetic(seed=0, format="sft", max_operand=9).train.items[0]
    text = tok.decode(item["input_ids"], skip_special_tokens=True)
    a, b = text.split("=")[0].split("+")
    assert int(text.split("=")[1]) == int(a) + int(b)
    learned = item["labels"][item["labels"] != -100]
    assert tok.decode(learned) == text.split("=")[1] + tok.eos_token
    dm = arithmetic(seed=0, format="prompts", max_operand=9)
    batch = dm.train.collate_fn([dm.train[i] for i in range(3)])
    for ids, mask, answer in zip(batch["input_ids"], batch["attention_mask"], batch["answer"]):
        problem = tok.decode(ids[mask.bool()])
        assert problem.endswith("=") and str(eval(problem[:-1])) == answer
    assert batch["attention_mask"][:, -1].all()  # left-padded: generation continues on the right


def test_the_character_tokenizer_round_trips():
    tok = char_tokenizer()
    ids = tok("99+1=100\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == 9 and tok.decode(ids) == "99+1=100\n"
    assert torch.tensor(ids).max() < len(tok) == 18
