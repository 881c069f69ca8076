"""Classification with mixup, and its confusion matrix."""

from helpers import run


def test_classification_mixup_and_confusion_png(write_config, tmp_path):
    run(
        write_config(
            {
                "task": {"type": "classification", "mixup_alpha": 0.2, "cutmix_alpha": 0.5},
                "model": {"type": "cnn", "channels": [8, 16]},
                "trainer.eval_every_n_steps": 10,
            }
        )
    )
    png = tmp_path / "runs/tiny/confusion_matrix.png"
    assert png.exists() and png.stat().st_size > 1000
