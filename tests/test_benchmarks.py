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
                    "## 2-process DDP", "## Predict and ONNX",
                    "## Self-supervised and metric learning on digits",
                    "## Language models on the standard library"):
        assert section in text
    assert "| ours |" in text and "n/a" not in text and "| simclr |" in text


def test_results_file_is_committed_and_complete():
    text = (ROOT / "benchmarks/RESULTS.md").read_text()
    for section in ("## Loop overhead", "## Start-up", "## Checkpoint", "## Data loading",
                    "## 2-process DDP", "## Predict and ONNX",
                    "## Self-supervised and metric learning on digits"):
        assert section in text
