"""Data loading: samples/s of the digits and an image-folder pipeline, against the training step
rate of the classification config. The loop must never wait for data in the default configs."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def loader_rate(dataset, batch_size: int, workers: int, batches: int) -> float:
    from src.data.loader import TrainLoader
    from src.data.samplers import ShardedBatchSampler

    loader = TrainLoader(
        dataset, ShardedBatchSampler(len(dataset), batch_size, seed=0), seed=0, num_workers=workers
    )
    n, t0, epoch = 0, time.perf_counter(), 0
    while n < batches:
        loader.set_epoch(epoch)
        for _ in loader:
            n += 1
            if n == batches:
                break
        epoch += 1
    return batches * batch_size / (time.perf_counter() - t0)


def make_image_folder(root: Path, per_class: int, size: int = 32) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                root / f"class_{c}" / f"{i}.png"
            )


def training_rate(steps: int) -> float:
    """samples/s of configs/exp001.yaml's own training loop."""
    import json

    from src.run.experiment import build, prepare

    root = Path(__file__).resolve().parents[1]
    tmp = tempfile.mkdtemp()
    cfg, origins = prepare(
        str(root / "configs/exp001.yaml"),
        [
            f"trainer.max_steps={steps}",
            "trainer.max_epochs=null",
            f"trainer.log_every={steps}",
            "trainer.eval_every_n_epochs=null",
            f"logging.root={tmp}",
            "logging.loggers=[jsonl]",
            "checkpoint.save_last=false",
            "checkpoint.every_n_steps=null",
        ],
    )
    exp = build(cfg, origins)
    exp.run()
    rows = [json.loads(line) for line in (Path(tmp) / "exp001/metrics.jsonl").open()]
    return rows[-1]["train/samples_per_sec"]


def measure(batches: int = 200, per_class: int = 100, steps: int = 200) -> dict[str, float]:
    from src.data.digits import digits
    from src.data.image_folder import image_folder

    out = {"exp001 training (samples/s)": training_rate(steps)}
    dm = digits(seed=0)
    for w in (0, 2):
        out[f"digits, {w} workers"] = loader_rate(dm.train, 64, w, batches)
    with tempfile.TemporaryDirectory() as tmp:
        make_image_folder(Path(tmp), per_class)
        folder = image_folder(seed=0, root=tmp, image_size=32).train
        for w in (0, 2):
            out[f"image_folder 32px, {w} workers"] = loader_rate(folder, 64, w, min(batches, 40))
    return out
