"""Runs of ``python -m src.main`` forked from a warm interpreter, for tests.

A fresh ``python -m src.main`` spends 3-8 CPU-seconds importing torch, torch._dynamo (which every
torch optimizer pulls in), DeepSpeed and the platform before its first step; the tests start a
few hundred runs and ranks. Here one server process per test worker (tests/warm_server.py)
imports all of it once and forks a child for each run: the child is a new process with its
own pid, environment, working directory, standard streams, exit code and signals, that executes
``src.main`` as ``__main__`` exactly as ``python -m src.main`` does, only without the imports.

Two ways in, both returning a ``subprocess.CompletedProcess``:

- :func:`run` -- one process, in place of ``subprocess.run([python, -m, src.main, ...])``;
- :func:`launch` -- ``nproc`` ranks of one run, with the variables torchrun sets (RANK,
  LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and one shared stdout and
  stderr, as torchrun's workers have. Unlike torchrun, which stops every other worker as soon as
  one fails, the other ranks get ``grace`` seconds to stop by themselves (what the platform
  promises), then SIGTERM. ``returncode`` is 0 when every rank exited 0, else 1 (torchrun's); the
  ranks' own codes are in ``returncodes``.

Tests about the launchers themselves (torchrun's restarts and reports, the deepspeed launcher,
multi-node rendezvous) start the real launcher; the server is for everything else.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What runs import, imported once by the server: torch and the platform's composition root, and
# DeepSpeed on its CPU accelerator (every test that runs it sets DS_ACCELERATOR=cpu; nothing of the
# platform imports it but the deepspeed strategy, so other runs do not notice it is loaded).
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "numpy",
    "yaml",
    "pydantic",
    "src.run.experiment",
    "deepspeed",
)


class _Server:
    """The warm process of this test worker and what it has reported (forks and exits)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None
        self.pids: dict[int, int] = {}  # request id -> pid
        self.exits: dict[int, int] = {}  # pid -> exit code (subprocess's: -N for signal N)
        self.next_id = 0
        self.buf = b""

    def _start(self):
        r, w = os.pipe()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("warm_server.py")),
                json.dumps(PRELOAD),
                str(w),
            ],
            stdin=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # DeepSpeed's import-time notices
            pass_fds=(w,),
            cwd=ROOT,
            env=env,
        )
        os.close(w)
        self.replies = r
        first = self._line(timeout=300)
        assert first and "ready" in first, "the warm test server did not start"

    def _line(self, timeout: float):
        """One reply from the server, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                return None
            data = os.read(self.replies, 65536)
            if not data:
                raise RuntimeError("the warm test server died")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _take(self, msg) -> None:
        if "exit" in msg:
            self.exits[msg["exit"]] = msg["code"]
        elif "id" in msg:
            self.pids[msg["id"]] = msg["pid"]

    def spawn(self, argv, env, cwd, stdout, stderr) -> int:
        """Forks one run; returns its pid."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.next_id += 1
            req = {
                "id": self.next_id,
                "argv": [str(a) for a in argv],
                "env": {k: str(v) for k, v in env.items()},
                "cwd": str(cwd),
                "stdout": str(stdout),
                "stderr": str(stderr),
                "root": str(ROOT),
            }
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            while req["id"] not in self.pids:
                msg = self._line(timeout=60)
                if msg is None:
                    raise RuntimeError("the warm test server did not fork")
                self._take(msg)
            return self.pids.pop(req["id"])

    def poll(self, pids, timeout: float) -> dict[int, int]:
        """The exit codes of those of ``pids`` that have ended, waiting up to ``timeout`` s for
        at least one (returns what is known then)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                done = {p: self.exits[p] for p in pids if p in self.exits}
                if done or time.monotonic() >= deadline:
                    return done
                msg = self._line(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                if msg is not None:
                    self._take(msg)


_SERVER = _Server()


def _kill(pids, sig) -> None:
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _run(argvs_envs, cwd, timeout: float, grace: float):
    """Starts one process per (argv, env), all writing to one stdout and one stderr; returns
    (codes in order, stdout, stderr). When one fails, the others get ``grace`` seconds to end by
    themselves, then SIGTERM and, 30 s later, SIGKILL (torchrun's order)."""
    with tempfile.TemporaryDirectory(prefix="warm-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        pids = [_SERVER.spawn(a, e, cwd, out, err) for a, e in argvs_envs]
        codes: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        signals = []  # (when, signal) still to send once a rank has failed
        try:
            while len(codes) < len(pids):
                now = time.monotonic()
                if now >= deadline:
                    raise subprocess.TimeoutExpired(argvs_envs[0][0], timeout)
                while signals and now >= signals[0][0]:
                    _kill([p for p in pids if p not in codes], signals.pop(0)[1])
                codes.update(_SERVER.poll([p for p in pids if p not in codes], timeout=0.5))
                if not signals and any(codes.values()) and len(codes) < len(pids):
                    now = time.monotonic()
                    signals = [(now + grace, signal.SIGTERM), (now + grace + 30, signal.SIGKILL)]
        finally:
            left = [p for p in pids if p not in codes]
            _kill(left, signal.SIGKILL)
            while left:
                codes.update(_SERVER.poll(left, timeout=5))
                left = [p for p in pids if p not in codes]
        return [codes[p] for p in pids], out.read_text(), err.read_text()


def run(
    *argv: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m src.main ARGV`` in a process forked warm (stdout and stderr as text)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    (code,), out, err = _run([(list(argv), env)], cwd, timeout, grace=0)
    return subprocess.CompletedProcess(["python", "-m", "src.main", *argv], code, out, err)


def launch(
    nproc: int,
    *argv: str,
    cwd: Path = ROOT,
    env: dict | None = None,
    master_port: int,
    timeout: float = 400,
    grace: float = 30,
) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc -m src.main ARGV`` with the ranks forked warm."""
    base = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    ranks = [
        {
            **base,
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "GROUP_RANK": "0",
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port),
        }
        for r in range(nproc)
    ]
    # torchrun's agent holds the rendezvous store, so a rank that exits early (a config error)
    # never takes it from the others: here the test process holds it
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", master_port, nproc, is_master=True, wait_for_workers=False)
    for e in ranks:
        e["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    try:
        codes, out, err = _run([(list(argv), e) for e in ranks], cwd, timeout, grace)
    finally:
        del store
    done = subprocess.CompletedProcess(
        ["torchrun", f"--nproc-per-node={nproc}", "-m", "src.main", *argv],
        0 if not any(codes) else 1,
        out,
        err,
    )
    done.returncodes = codes  # type: ignore[attr-defined]
    return done
