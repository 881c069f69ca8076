"""Lost and hung ranks under the real launcher: torchrun --max-restarts brings a run whose rank
was killed back from its latest checkpoint with the uninterrupted run's metrics; a stopped rank
fails the others within strategy.timeout_s; two "nodes" on one machine rendezvous over c10d."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, port
from helpers import launch, metrics

pytestmark = pytest.mark.distributed

SLOW_PLUGIN = '''
import time
from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS

@CALLBACKS.register("pace")
class Pace(Callback):
    """Each step takes at least `seconds`: time to act on a run from outside."""
    def __init__(self, seconds: float):
        self.seconds = seconds
    def on_step_end(self, trainer, outputs):
        time.sleep(self.seconds)
'''

BASE = {
    "trainer.max_steps": 30,
    "trainer.log_every": 1,
    "trainer.eval_every_n_epochs": None,
    "trainer.eval_every_n_steps": 10,
    "checkpoint.every_n_steps": 5,
    "checkpoint.keep_last": 2,
    "data.batch_size": 64,
    "model": {"type": "mlp", "hidden": [64, 32]},
    "imports": ["pace_plugin"],
    "callbacks": [{"type": "pace", "seconds": 0.15}],
}


@pytest.fixture
def started():
    """Popen for launchers: each in its own session, killed with its workers at the end."""
    procs = []

    def start(cmd, config):
        proc = subprocess.Popen(
            cmd,
            env=env_for(config),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def env_for(config: Path) -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}:{config.parent}", "OMP_NUM_THREADS": "1"}


def workers(agent: int) -> dict[int, int]:
    """local rank -> pid of the workers a torchrun agent started (its children)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent:
                continue
            env = dict(
                kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv
            )
        except (OSError, IndexError, ValueError):
            continue
        if "LOCAL_RANK" in env:
            out[int(env["LOCAL_RANK"])] = int(entry.name)
    return out


def alive(pid: int) -> bool:
    """Running (a process that exited but is not yet reaped is a zombie: not alive)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except (OSError, IndexError):
        return False


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 200) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_nothing_happened(
    write_config, tmp_path, strategy, started
):
    (tmp_path / "pace_plugin.py").write_text(SLOW_PLUGIN)
    common = {**BASE, "strategy": {"type": strategy}}
    launch(2, write_config({**common, "name": "straight"}, "a.yaml"))

    cfg = write_config({**common, "name": "killed"}, "b.yaml")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--max-restarts=1",
        f"--master_port={port()}",
        "-m",
        "src.main",
        "--config",
        str(cfg),
    ]
    proc = started(cmd, cfg)
    wait_for(tmp_path / "runs/killed/checkpoints/step_00000010/COMMIT", proc)
    time.sleep(0.5)  # mid-way between two checkpoints
    os.kill(workers(proc.pid)[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "exitcode: -9" in err, err[-3000:]  # the kill happened, torchrun restarted the group
    assert metrics(tmp_path / "runs/straight") == metrics(tmp_path / "runs/killed")


def test_a_stopped_rank_fails_the_others_within_the_timeout(write_config, tmp_path, started):
    """SIGSTOP on rank 1 (a hung host): rank 0 gives up after strategy.timeout_s with one line
    instead of waiting for the default half hour; nothing past the last commit is kept."""
    (tmp_path / "pace_plugin.py").write_text(SLOW_PLUGIN)
    cfg = write_config({**BASE, "strategy": {"type": "ddp", "timeout_s": 5}})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port()}",
        "-m",
        "src.main",
        "--config",
        str(cfg),
    ]
    proc = started(cmd, cfg)
    wait_for(tmp_path / "runs/tiny/checkpoints/step_00000005/COMMIT", proc)
    pids = workers(proc.pid)
    hung, rank0 = pids[1], pids[0]
    os.kill(hung, signal.SIGSTOP)
    stopped = time.time()
    try:
        while alive(rank0) and time.time() < stopped + 120:
            time.sleep(0.1)
        rank0_gone = time.time() - stopped
    finally:
        os.kill(hung, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert rank0_gone < 5 + 25, (rank0_gone, err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("error: rank 0")]
    assert len(lines) == 1 and "strategy.timeout_s = 5" in lines[0], err[-3000:]


def test_two_nodes_rendezvous_over_c10d_and_match_one_node(write_config, tmp_path, started):
    """torchrun --nnodes 2 --rdzv-backend c10d on localhost, one process per "node", trains
    exactly as 2 processes on one node do (the multi-node command of docs/distributed.md)."""
    (tmp_path / "pace_plugin.py").write_text(SLOW_PLUGIN)
    common = {**BASE, "strategy": {"type": "ddp"}, "callbacks": [], "imports": []}
    launch(2, write_config({**common, "name": "one_node"}, "a.yaml"))
    cfg = write_config({**common, "name": "two_nodes"}, "b.yaml")
    endpoint = f"127.0.0.1:{port()}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-id=two_nodes",
        "-m",
        "src.main",
        "--config",
        str(cfg),
    ]
    nodes = [started(cmd, cfg) for _ in range(2)]
    for node in nodes:
        out, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert metrics(tmp_path / "runs/one_node") == metrics(tmp_path / "runs/two_nodes")
