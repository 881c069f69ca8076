"""Clusters: how long a run takes from SIGTERM (what a SLURM job's tasks get at the time-limit
signal, on preemption or on ``scancel --signal=TERM``) to its committed checkpoint and exit. It
must fit well inside ``slurm.signal_grace_s`` (120 s by default).

Each config trains in a fresh process (``trainer.compile=false``, the console logger only) until
its first logged step past ``--after``; SIGTERM is then sent and the time until the step's
checkpoint has its COMMIT marker, and until the process has exited, is measured.

    python -m benchmarks.clusters [--repeats 3]     # prints the section
    python -m benchmarks.run --only clusters --update
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"exp001": ("configs/exp001.yaml", 30), "lm_stdlib": ("configs/lm_stdlib.yaml", 20)}


def once(config: str, after: int, work: Path, quick: bool) -> dict:
    work = Path(tempfile.mkdtemp(dir=work))  # a folder of its own: no other run's metrics
    args = [
        sys.executable, "-m", "src.main", "--config", config, "name=job",
        f"logging.root={work / 'runs'}", "trainer.log_every=1", "trainer.compile=false",
        "trainer.max_steps=100000", "trainer.max_epochs=null",
        "checkpoint.every_n_steps=100000", "trainer.eval_every_n_steps=null",
    ]  # fmt: skip
    if quick:
        args.append("data.max_files=20" if "lm_" in config else "data.batch_size=16")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    run = work / "runs" / "job"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        m = run / "metrics.jsonl"
        if m.is_file():
            steps = [json.loads(x).get("step", 0) for x in m.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= after:
                break
        time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(f"{config} ended early:\n{proc.stderr.read().decode()[-3000:]}")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    committed = None
    while proc.poll() is None or committed is None:
        if committed is None and any((run / "checkpoints").glob("step_*/COMMIT")):
            committed = time.monotonic() - t0
        if proc.poll() is not None and committed is None:
            committed = (
                time.monotonic() - t0 if any((run / "checkpoints").glob("step_*/COMMIT")) else -1.0
            )
        time.sleep(0.01)
    exited = time.monotonic() - t0
    assert proc.returncode == 128 + signal.SIGTERM, (
        proc.returncode,
        proc.stderr.read().decode()[-2000:],
    )
    ckpt = next((run / "checkpoints").glob("step_*"))
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    return {"committed_s": committed, "exited_s": exited, "bytes": size}


def measure(repeats: int = 3, quick: bool = False) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, after) in CONFIGS.items():
            out[name] = [
                once(config, 3 if quick else after, Path(tmp), quick) for _ in range(repeats)
            ]
    return out


def section(res: dict) -> list[str]:
    rows = [
        "| config | checkpoint | SIGTERM -> committed checkpoint (s) | SIGTERM -> exit (s) |",
        "|---|---|---|---|",
    ]
    for name, runs in res.items():
        c = [r["committed_s"] for r in runs]
        e = [r["exited_s"] for r in runs]
        rows.append(
            f"| {name} | {runs[0]['bytes'] / 1e6:.1f} MB | "
            f"{min(c):.2f} / {statistics.median(c):.2f} / {max(c):.2f} | "
            f"{min(e):.2f} / {statistics.median(e):.2f} / {max(e):.2f} |"
        )
    return [
        "What a SLURM job has to fit inside `slurm.signal_grace_s` (default 120 s) before its time "
        "limit: from SIGTERM, which every task gets at the time-limit signal, on preemption or on "
        "`scancel --signal=TERM`, to the step's committed checkpoint, and to the process's exit "
        "(the rank then requeues the job). A fresh process each, signalled mid-training; min / "
        "median / max of the repeats.",
        "",
        *rows,
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print("\n".join(section(measure(args.repeats))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
