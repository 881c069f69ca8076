"""Predict against a hand-written inference loop, and onnxruntime against PyTorch.

    python -m benchmarks.inference --prepare ROOT            # train the digits CNN once (exp001)
    python -m benchmarks.inference --variant ours --run ROOT/exp001 --repeat 20
    python -m benchmarks.inference --variant hand --run ROOT/exp001 --repeat 20
    python -m benchmarks.inference --latency --run ROOT/exp001

Both predict variants run in a fresh process on the same model (exp001's CNN, loaded from the
run's checkpoint) over the same samples (the validation split repeated ``--repeat`` times, as one
in-memory dataset), at the same batch size, and write the same JSONL rows (id, label, name,
probability, top 5). ``loop_s`` is the time from the first batch to the file written; the caller
also takes the whole process's wall time. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BATCH = 64


def _dataset(run, repeat: int):
    from src.data.tensor_dataset import InMemoryDataset

    val = run.data.val
    return InMemoryDataset(
        val.inputs.repeat(repeat, *[1] * (val.inputs.ndim - 1)), val.labels.repeat(repeat)
    )


def ours(run_dir: str, repeat: int, out: Path) -> float:
    from src.run.inference import load_run
    from src.run.predict import predict, write

    run = load_run(run=run_dir)
    data = _dataset(run, repeat)
    t0 = time.perf_counter()
    result = predict(run, data, BATCH, progress=False)
    write(result, out, list(run.data.info.class_names), 5)
    return time.perf_counter() - t0


def hand(run_dir: str, repeat: int, out: Path) -> float:
    """What one writes by hand: the model built and loaded once, a plain loop, rows by json."""
    import torch

    from src.run.inference import load_run

    run = load_run(run=run_dir)
    model, data = run.task.model.eval(), _dataset(run, repeat)
    names = list(run.data.info.class_names)
    t0 = time.perf_counter()
    with torch.inference_mode(), open(out, "w") as f:
        for start in range(0, len(data), BATCH):
            x = data.inputs[start : start + BATCH]
            probs = model(x).float().softmax(-1)
            top_p, top_i = probs.topk(5, dim=-1)
            labels = data.labels[start : start + BATCH]
            for j, (p, i, y) in enumerate(zip(top_p.tolist(), top_i.tolist(), labels.tolist())):
                f.write(
                    json.dumps(
                        {
                            "id": start + j,
                            "label": i[0],
                            "name": names[i[0]],
                            "prob": p[0],
                            "top_k": [
                                {"label": c, "name": names[c], "prob": round(q, 6)}
                                for c, q in zip(i, p)
                            ],
                            "target": y,
                            "target_name": names[y],
                        }
                    )
                    + "\n"
                )
    return time.perf_counter() - t0


def latency(run_dir: str, calls: int) -> dict:
    """Median seconds per call, onnxruntime vs PyTorch (eager, inference mode), at batch 1 and
    32, default thread counts; the two alternate in blocks of 10 calls."""
    import onnxruntime as ort
    import torch

    from src.run.export import export_run, sample_batch
    from src.run.inference import load_run

    run = load_run(run=run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_run(run, "onnx", path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        model = run.task.model.eval()
        out = {}
        for b in (1, 32):
            x = sample_batch(run.data.val, b)["inputs"]
            xn = x.numpy()
            times = {"onnxruntime": [], "pytorch": []}
            with torch.inference_mode():
                for _ in range(20):  # warm-up
                    session.run(None, {"inputs": xn})
                    model(x)
                for _ in range(calls // 10):
                    for name in ("onnxruntime", "pytorch"):
                        t0 = time.perf_counter()
                        for _ in range(10):
                            session.run(None, {"inputs": xn}) if name == "onnxruntime" else model(x)
                        times[name].append((time.perf_counter() - t0) / 10)
            out[b] = {k: statistics.median(v) for k, v in times.items()}
    return out


def prepare(root: str, quick: bool) -> str:
    import subprocess

    from benchmarks.run import ROOT

    steps = ["trainer.max_steps=20", "trainer.max_epochs=null"] if quick else []
    subprocess.run(
        [
            sys.executable,
            "-m",
            "src.main",
            "--config",
            "configs/exp001.yaml",
            f"logging.root={root}",
            "logging.loggers=[jsonl]",
            *steps,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return str(Path(root) / "exp001")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=("ours", "hand"))
    p.add_argument("--latency", action="store_true")
    p.add_argument("--run")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--calls", type=int, default=500)
    args = p.parse_args(argv)
    if args.latency:
        print(json.dumps(latency(args.run, args.calls)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.jsonl"
        loop = (ours if args.variant == "ours" else hand)(args.run, args.repeat, out)
        rows = sum(1 for _ in open(out))
    print(json.dumps({"loop_s": loop, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
