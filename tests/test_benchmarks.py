"""Each benchmark runs once at a tiny size, so `python -m benchmarks.run` keeps working.
(No timing is asserted here: the figures live in benchmarks/RESULTS.md.)"""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_every_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for section in ("## Loop overhead", "## Start-up", "## Checkpoint", "## Data loading",
                    "## 2-process DDP", "## Predict and ONNX", "## Sweeps",
                    "## Self-supervised and metric learning on digits",
                    "## Language models on the standard library"):
        assert section in text
    assert "| ours |" in text and "n/a" not in text and "| simclr |" in text


def test_results_file_is_committed_and_complete():
    text = (ROOT / "benchmarks/RESULTS.md").read_text()
    for section in ("## Loop overhead", "## Start-up", "## Checkpoint", "## Data loading",
                    "## 2-process DDP", "## Predict and ONNX", "## Sweeps",
                    "## Self-supervised and metric learning on digits"):
        assert section in text


def test_recorded_sweep_meets_its_goals():
    """The "Sweeps" table of RESULTS.md: the shipped sweep finds >= 0.97; with Hyperband >= 40% of
    trials are pruned, in under half the steps of the same sweep unpruned, best within 0.01."""
    import re

    text = (ROOT / "benchmarks/RESULTS.md").read_text().split("## Sweeps", 1)[1].split("\n## ")[0]
    rows = {}
    for m in re.finditer(r"^\| (\w+) \| (\d) \| (\d+) \| (\d+) \(\d+%\) \| (\d+) \| ([\d,]+) \| "
                         r"([\d.]+) \| (\d+) \|$", text, re.M):
        pruner, workers, trials, pruned, failed, steps, best, wall = m.groups()
        rows[pruner, int(workers)] = (int(trials), int(pruned), int(steps.replace(",", "")),
                                      float(best), int(wall))
    assert set(rows) == {("hyperband", 1), ("none", 1), ("hyperband", 2), ("none", 2)}
    for workers in (1, 2):
        trials, pruned, steps, best, _ = rows["hyperband", workers]
        trials_n, _, steps_n, best_n, _ = rows["none", workers]
        assert trials == trials_n == 24 and best >= 0.97 and best_n >= 0.97
        assert pruned >= 0.4 * trials and steps < steps_n / 2 and abs(best - best_n) <= 0.01
