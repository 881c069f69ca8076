"""One writer per run folder: a second run on a busy folder is refused; a dead owner's is taken."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from src.run.lock import LOCK_FILE, RunLock


def test_a_held_folder_is_refused_naming_its_owner_and_free_again_after_release(tmp_path):
    first, second = RunLock(tmp_path / "runs/a"), RunLock(tmp_path / "runs/a")
    assert first.busy() is None
    owner = second.busy()
    assert owner is not None and f"pid {os.getpid()}" in owner
    first.release()
    assert second.busy() is None
    second.release()


def test_a_dead_owners_lock_is_taken_over_with_a_warning(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / LOCK_FILE).write_text("pid 999999 on elsewhere since 2026-01-01 00:00:00\n")
    lock = RunLock(tmp_path / "a")
    with pytest.warns(UserWarning, match="pid 999999 .* no longer running; taking it over"):
        assert lock.busy() is None
    lock.release()
    assert not (tmp_path / "a" / LOCK_FILE).exists()


def test_a_run_that_wrote_nothing_leaves_no_folders(tmp_path):
    lock = RunLock(tmp_path / "runs/deep/a")
    assert lock.busy() is None and (tmp_path / "runs/deep/a" / LOCK_FILE).exists()
    lock.release()
    assert not (tmp_path / "runs").exists()


HOLD_PLUGIN = '''
import os, time
from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS

@CALLBACKS.register("hold")
class Hold(Callback):
    """From step 5 on, waits while the file HOLD exists (at most 120 s)."""
    def on_step_end(self, trainer, outputs):
        t0 = time.time()
        while trainer.step >= 5 and os.path.exists(os.environ["HOLD"]) and time.time() - t0 < 120:
            time.sleep(0.02)
'''


@pytest.mark.slow
def test_the_same_command_twice_is_refused_while_the_first_trains(write_config, tmp_path):
    """The second start exits 2 with one line naming the first one's pid, writes nothing, and the
    first run's metrics have each step once (they had 103 duplicate rows in 1,500 steps)."""
    (tmp_path / "hold_plugin.py").write_text(HOLD_PLUGIN)
    hold = tmp_path / "hold"
    hold.touch()
    cfg = write_config(
        {
            "imports": ["hold_plugin"],
            "callbacks": [{"type": "hold"}],
            "trainer.max_steps": 40,
            "trainer.log_every": 1,
            "checkpoint.every_n_steps": 2,
        }
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "HOLD": str(hold)}
    cmd = [sys.executable, "-m", "src.main", "--config", str(cfg)]
    first = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "runs/tiny/metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert first.poll() is None and time.time() < deadline, "the first run ended too soon"
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first run should still be training"
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: ")
        and f"in use by pid {first.pid} on" in lines[0]
    ), second.stderr
    hold.unlink()
    assert first.wait(timeout=300) == 0, first.stderr.read()
    steps = [
        json.loads(line)["step"]
        for line in metrics.read_text().splitlines()
        if "train/loss" in line
    ]
    assert steps == list(range(1, 41))
    assert not (tmp_path / "runs/tiny" / LOCK_FILE).exists()


def test_a_killed_runs_folder_is_free_while_its_forked_workers_live_on(tmp_path):
    """A run holding the lock forks a worker (as a DataLoader does) and is killed with -9: the
    folder is free at once, though the worker, which inherited the lock's descriptor, lives on."""
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
from src.run.lock import RunLock
lock = RunLock({str(tmp_path / "run")!r})
assert lock.busy() is None
child = os.fork()
if child == 0:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1), os.dup2(null, 2)  # the test reads the parent's output to its end
    time.sleep(30)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    worker = int(out.stdout.split()[0])
    try:
        os.kill(worker, 0)  # still alive
        lock = RunLock(tmp_path / "run")
        with pytest.warns(UserWarning, match="no longer running; taking it over"):
            assert lock.busy() is None
        lock.release()
    finally:
        os.kill(worker, 9)
