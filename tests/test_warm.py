"""The tests' warm runs (tests/warm.py) behave as ``python -m src.main`` does: the same output and
exit code, their own environment, working folder and signals, and ranks that rendezvous."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import warm
from conftest import ROOT, port

PLUGIN = """
import os, sys
print("cwd", os.getcwd(), "var", os.environ.get("WARM_PROBE"), "argv0", os.path.basename(sys.argv[0]))
print("main", sys.modules["__main__"].__name__ if "__main__" in sys.modules else None)
if os.environ.get("WARM_SIGNAL"):
    os.kill(os.getpid(), int(os.environ["WARM_SIGNAL"]))
"""


def fresh(*args: str, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "src.main", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_warm_run_prints_and_exits_as_a_fresh_one(tmp_path, write_config):
    bad = write_config({"optimizer.lr": -1})
    for args in (["--list", "tasks"], ["--config", str(bad)], ["--config", "missing.yaml"]):
        a, b = warm.run(*args), fresh(*args)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args


def test_a_warm_run_has_its_own_folder_variables_imports_and_signals(tmp_path, write_config):
    (tmp_path / "probe.py").write_text(PLUGIN)
    cfg = write_config({"trainer.max_steps": 1})
    env = {"WARM_PROBE": "yes", "PYTHONPATH": f"{ROOT}:{tmp_path}"}
    out = warm.run("--import", "probe", "--config", str(cfg), "--dry-run", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert f"cwd {tmp_path} var yes argv0 main.py\nmain __main__" in out.stdout
    assert "WARM_PROBE" not in os.environ  # the test's own process is untouched
    killed = warm.run(
        "--import", "probe", "--config", str(cfg), cwd=tmp_path,
        env={**env, "WARM_SIGNAL": str(int(signal.SIGKILL))},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL


def test_warm_ranks_train_together_and_report_each_exit_code(write_config, tmp_path):
    cfg = write_config({"strategy": {"type": "ddp"}, "trainer.max_steps": 4})
    env = {"OMP_NUM_THREADS": "1"}
    ok = warm.launch(2, "--config", str(cfg), env=env, master_port=port())
    assert ok.returncode == 0 and ok.returncodes == [0, 0], ok.stderr[-2000:]
    bad = write_config({"strategy": {"type": "ddp"}, "data.batch_size": 63}, "bad.yaml")
    out = warm.launch(2, "--config", str(bad), env=env, master_port=port())
    assert out.returncode == 1 and out.returncodes == [2, 2], out.stderr[-2000:]
