"""Start-up: wall time of ``--help``, ``--list`` and ``--dry-run`` of exp001 as fresh processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "--help": ["--help"],
    "--list": ["--list"],
    "--dry-run exp001": ["--config", "configs/exp001.yaml", "--dry-run"],
}


def measure(repeats: int = 5) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, args in COMMANDS.items():  # interleaved, so drift hits every command alike
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "src.main", *args], cwd=ROOT, check=True, capture_output=True
            )
            out[name].append(time.perf_counter() - t0)
    return out
