"""Shared fixtures: tiny configs, a CLI runner, free ports, and clean process state per test."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# pytest -n auto runs one worker per core: one thread each (set before torch is imported, and
# inherited by every process a test starts), or the workers' thread pools wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Token stores and trained tokenizers of the tests (and of the runs they start) go to a cache of
# this test session, not the user's ~/.cache/tessera.
_CACHE = tempfile.mkdtemp(prefix="tessera-test-cache-")
os.environ["TESSERA_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"type": "digits", "val_fraction": 0.2, "batch_size": 32},
    "model": {"type": "mlp", "hidden": [32]},
    "task": {"type": "classification"},
    "optimizer": {"type": "adamw", "lr": 1e-3},
    "scheduler": {"type": "constant"},
    "trainer": {"max_steps": 20, "log_every": 5, "eval_every_n_epochs": None},
    "checkpoint": {"every_n_steps": 10, "keep_last": 2},
    "logging": {"loggers": ["jsonl"]},
}


@pytest.fixture(autouse=True)
def _restore_process_state(monkeypatch):
    """Each test gets its own environment copy; any process group it made is destroyed."""
    env = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(env)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def make_config(folder: Path, changes: dict | None = None, name: str = "c.yaml") -> Path:
    """A tiny config (TINY with dotted-key ``changes``) written to folder/name; runs go to
    folder/runs."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["logging"]["root"] = str(folder / "runs")
    for key, value in (changes or {}).items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = copy.deepcopy(value)  # later dotted keys must not edit the caller's dicts
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def write_config(tmp_path):
    """write_config(changes: dict, name="c.yaml") -> Path of a tiny config under tmp_path."""
    return lambda changes=None, name="c.yaml": make_config(tmp_path, changes, name)


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300, env: dict | None = None):
    """``python -m src.main ARGS`` in a new process (forked from a warm interpreter: tests/warm.py);
    returns CompletedProcess (text)."""
    import warm

    return warm.run(*args, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def port() -> int:
    """A TCP port free on this machine now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return port()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A small BPE trained on the json package, saved like a pretrained tokenizer."""
    from src.data.text import resolve_files, train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(resolve_files(["stdlib:json"]), 400)
    tok.save_pretrained(str(folder))
    return folder
