"""Metric learning with P x K batches."""

from helpers import metrics, run


def test_metric_learning_with_pk_batches(write_config, tmp_path):
    run(
        write_config(
            {
                "data.batch_size": 40,
                "data.sampler": {"type": "pk", "classes_per_batch": 10, "samples_per_class": 4},
                "model": {"type": "cnn", "channels": [8, 16], "num_classes": 0},
                "task": {
                    "type": "metric_learning",
                    "head": "subcenter_arcface",
                    "embedding_dim": 16,
                },
                "trainer.max_steps": 5,
                "trainer.eval_every_n_steps": 5,
            }
        )
    )
    val = [r for r in metrics(tmp_path / "runs/tiny") if "val/recall@1" in r][-1]
    assert 0 <= val["val/map@r"] <= val["val/recall@1"] <= val["val/recall@5"] <= 1
