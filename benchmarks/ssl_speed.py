"""Self-supervised training throughput with per-sample views (torchvision, in the loader) against
views made for the whole batch on its device (src/data/batch_views.py), on the shipped configs.
One variant per process:

    python -m benchmarks.ssl_speed --config ssl_simclr_digits --views batch --steps 40

prints one JSON line: {"config", "views", "images_per_sec"} (training images per second over the
steps after the first logging interval; evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each config's per-sample views section, and the same options made for the batch
VIEWS = {
    "ssl_simclr_digits": ("{type: views, n_views: 2}", "{type: batch_views, n_views: 2}"),
    "ssl_dino_digits": (
        "{type: multi_crop, global_views: 2, local_views: 2, local_size: 6}",
        "{type: batch_multi_crop, global_views: 2, local_views: 2, local_size: 6}",
    ),
}
INTERVAL = 10


def images_per_sec(config: str, views: str, steps: int) -> float:
    from src.run.experiment import build, prepare

    section = VIEWS[config][0 if views == "sample" else 1]
    cfg, origins = prepare(
        str(ROOT / f"configs/{config}.yaml"),
        [
            f"task.views={section}",
            f"logging.root={tempfile.mkdtemp()}",
            "logging.loggers=[jsonl]",
            f"trainer.max_steps={steps + INTERVAL}",
            "trainer.max_epochs=null",
            f"trainer.log_every={INTERVAL}",
            "trainer.eval_every_n_epochs=null",
            "checkpoint.every_n_epochs=null",
            "checkpoint.save_last=false",
            "callbacks=[]",
        ],
    )
    exp = build(cfg, origins)
    exp.run()
    rows = [json.loads(line) for line in (exp.run_dir / "metrics.jsonl").open()]
    rates = [r["train/samples_per_sec"] for r in rows if "train/samples_per_sec" in r][1:]
    return len(rates) / sum(1 / r for r in rates)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", choices=list(VIEWS), required=True)
    p.add_argument("--views", choices=["sample", "batch"], required=True)
    p.add_argument("--steps", type=int, default=40, help="timed steps (a multiple of 10)")
    a = p.parse_args(argv)
    print(
        json.dumps(
            {
                "config": a.config,
                "views": a.views,
                "images_per_sec": round(images_per_sec(a.config, a.views, a.steps), 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
