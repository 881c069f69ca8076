import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from helpers import metrics, params, run, same
from safetensors.torch import load_file

from src.core.checkpoint import CheckpointManager
from src.core.config import CheckpointConfig
from src.core.errors import CheckpointError
from src.distributed.single import SingleDeviceStrategy

RESUME = {
    "trainer.max_steps": 70,
    "trainer.eval_every_n_steps": 25,
    "trainer.log_every": 7,
    "checkpoint.every_n_steps": 10,
    "model": {"type": "mlp", "hidden": [32], "dropout": 0.2},
    "data.batch_size": 48,
}


@pytest.mark.parametrize("stop_at,signum", [(37, signal.SIGTERM), (55, signal.SIGINT)])
def test_stop_then_resume_is_bitwise_identical(write_config, tmp_path, stop_at, signum):
    """Straight to 70 steps == stop mid-epoch (29 batches/epoch) at k + resume to 70."""
    straight = run(write_config({**RESUME, "name": "straight"}))
    cfg = write_config(
        {
            **RESUME,
            "name": "stopped",
            "callbacks": [{"type": "signal_at_step", "step": stop_at, "signum": int(signum)}],
        }
    )
    with pytest.raises(SystemExit) as e:
        run(cfg)
    assert e.value.code == 128 + signum
    run_dir = tmp_path / "runs/stopped"
    assert (run_dir / f"checkpoints/step_{stop_at:08d}/COMMIT").exists()
    resumed = run(cfg, "callbacks=[]")
    assert same(params(straight), params(resumed))
    assert metrics(tmp_path / "runs/straight") == metrics(run_dir)


def test_async_save_commits_after_the_write_and_resumes_exactly(write_config, tmp_path):
    straight = run(write_config({**RESUME, "name": "straight"}))
    cfg = write_config(
        {
            **RESUME,
            "name": "async",
            "checkpoint.async_save": True,
            "callbacks": [{"type": "signal_at_step", "step": 44}],
        }
    )
    with pytest.raises(SystemExit):
        run(cfg)
    step = tmp_path / "runs/async/checkpoints/step_00000044"
    assert (step / "COMMIT").exists() and (step / "dcp/.metadata").exists()
    resumed = run(cfg, "callbacks=[]")
    assert same(params(straight), params(resumed))
    assert metrics(tmp_path / "runs/straight") == metrics(tmp_path / "runs/async")


SLOW_PLUGIN = """
import time
from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS

@CALLBACKS.register("slow")
class Slow(Callback):
    def on_step_end(self, trainer, outputs):
        time.sleep(0.05)
"""


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_identical(write_config, tmp_path):
    (tmp_path / "slow_plugin.py").write_text(SLOW_PLUGIN)
    base = {
        **RESUME,
        "imports": ["slow_plugin"],
        "callbacks": [{"type": "slow"}],
        "checkpoint.every_n_steps": 5,
    }
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}"}
    cmd = [sys.executable, "-m", "src.main", "--config"]
    straight = write_config({**base, "name": "straight"}, name="s.yaml")
    subprocess.run(cmd + [str(straight)], env=env, check=True, capture_output=True)
    killed = write_config({**base, "name": "killed"}, name="k.yaml")
    ckpts = tmp_path / "runs/killed/checkpoints"
    target = random.Random().randint(2, 12) * 5
    proc = subprocess.Popen(
        cmd + [str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (ckpts / f"step_{target:08d}/COMMIT").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    out = subprocess.run(cmd + [str(killed)], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stderr
    a = load_file(str(tmp_path / "runs/straight/checkpoints/step_00000070/model.safetensors"))
    b = load_file(str(ckpts / "step_00000070/model.safetensors"))
    assert same(a, b)
    assert metrics(tmp_path / "runs/straight") == metrics(tmp_path / "runs/killed")


def _manager(tmp_path, **cfg) -> CheckpointManager:
    strategy = SingleDeviceStrategy("cpu")
    strategy.setup()
    return CheckpointManager(CheckpointConfig(**cfg), tmp_path / "ckpt", strategy)


def _save(m, step, metric=None):
    model = torch.nn.Linear(2, 2)
    return m.save(
        step,
        0,
        model,
        None,
        {"step": step},
        {},
        metrics={"val/acc": metric} if metric is not None else None,
    )


def test_rotation_keep_last_keep_every_top_k(tmp_path):
    m = _manager(tmp_path, keep_last=2, keep_every=40, top_k=1, monitor="val/acc", mode="max")
    scores = {10: 0.5, 20: 0.9, 30: 0.6, 40: 0.1, 50: 0.2, 60: 0.3}
    for step, score in scores.items():
        _save(m, step, score)
    assert [p.name for p in m.committed()] == [
        "step_00000020",
        "step_00000040",
        "step_00000050",
        "step_00000060",
    ]
    assert (tmp_path / "ckpt/latest").read_text() == "step_00000060"
    assert m.best().name == "step_00000020"


def test_uncommitted_directories_are_ignored_and_cleaned(tmp_path):
    m = _manager(tmp_path)
    _save(m, 10)
    half = tmp_path / "ckpt/step_00000020"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert m.latest().name == "step_00000010"
    assert [p.name for p in m.candidates()] == ["step_00000010"]
    m.clean_uncommitted()
    assert not half.exists()


def test_corrupt_latest_falls_back_with_a_warning(write_config, tmp_path):
    cfg = write_config({"trainer.max_steps": 20})
    run(cfg)
    ckpts = tmp_path / "runs/tiny/checkpoints"
    model = ckpts / "step_00000020/model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = run(cfg, "trainer.max_steps=25")
    msgs = [str(w.message) for w in caught if "skipping checkpoint" in str(w.message)]
    assert msgs and "model.safetensors" in msgs[0]
    assert metrics(tmp_path / "runs/tiny")[-1]["step"] == 25
    assert exp is not None


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_explicit_corrupt_checkpoint_is_a_one_line_error(write_config, tmp_path, capsys, damage):
    from src.main import main

    cfg = write_config({"trainer.max_steps": 10})
    run(cfg)
    step = tmp_path / "runs/tiny/checkpoints/step_00000010"
    f = step / "optimizer.pt"
    f.write_bytes(f.read_bytes()[:50] if damage == "truncate" else b"\x80\x04garbage")
    code = main(["--config", str(cfg), f"checkpoint.resume={step}", "trainer.max_steps=12"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{f}: unreadable checkpoint file" in err[0]


def test_shape_mismatch_lists_the_keys(write_config, tmp_path, capsys):
    from src.main import main

    cfg = write_config({"trainer.max_steps": 10})
    run(cfg)
    # (a rerun in the same folder is refused earlier, by the config's difference: see
    # test_run_record; a checkpoint given explicitly is checked against the model)
    ckpt = tmp_path / "runs/tiny/checkpoints/step_00000010"
    code = main(
        [
            "--config",
            str(cfg),
            "model.hidden=[16]",
            "trainer.max_steps=12",
            "name=other",
            f"checkpoint.resume={ckpt}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the model" in err
    assert not (tmp_path / "runs/other").exists()
    assert "model.net.1.weight (32, 64) vs model (16, 64)" in err


def test_resume_never_refuses_to_overwrite_an_earlier_run(write_config, tmp_path, capsys):
    from src.main import main

    cfg = write_config({"trainer.max_steps": 10})
    run(cfg)
    code = main(["--config", str(cfg), "checkpoint.resume=never"])
    assert code == 2 and "holds checkpoints of an earlier run" in capsys.readouterr().err


def test_loading_never_unpickles_code(tmp_path):
    from src.distributed.base import safe_load

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="unreadable checkpoint file"):
        safe_load(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_find_checkpoint_takes_a_step_a_checkpoints_folder_or_a_run_folder(write_config, tmp_path):
    from src.core.checkpoint import find_checkpoint
    from src.core.errors import CheckpointError

    run(write_config())  # saves at steps 10 and 20
    run_dir = tmp_path / "runs/tiny"
    last = run_dir / "checkpoints/step_00000020"
    assert find_checkpoint(run_dir) == last
    assert find_checkpoint(run_dir / "checkpoints") == last
    assert find_checkpoint(run_dir / "checkpoints/step_00000010").name == "step_00000010"
    (last / "COMMIT").unlink()  # an interrupted save is never picked
    (run_dir / "checkpoints/latest").unlink()
    assert find_checkpoint(run_dir).name == "step_00000010"
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        find_checkpoint(last)


# ------------------------------------------------------------------ a save that cannot be written

FULL = {
    "trainer.max_steps": 20,
    "checkpoint.every_n_steps": 5,
    "checkpoint.keep_last": 3,
    "model": {"type": "mlp", "hidden": [256, 256]},
}


def _losses(run_dir):
    return {r["step"]: r["train/loss"] for r in metrics(run_dir) if "train/loss" in r}


@pytest.fixture
def straight(write_config, tmp_path):
    """The uninterrupted run the interrupted ones must match."""
    run(write_config({**FULL, "name": "straight"}, "straight.yaml"))
    return metrics(tmp_path / "runs/straight")


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_loses_nothing_says_so_and_resumes_exactly(
    write_config, tmp_path, capsys, monkeypatch, straight, async_save
):
    """The write of step 15 fails for lack of space (the file half-written, as a full disk
    leaves it): one line naming the path and the space, exit 75, the partial folder gone,
    ``latest`` still step 10; the same command then finishes with the uninterrupted metrics.
    With async_save the failure happens on the writer thread and surfaces on the training one."""
    import errno

    import torch.distributed.checkpoint as dcp

    from src.distributed.base import Strategy
    from src.main import main

    def full_disk(directory):
        if Path(directory).name.startswith("step_00000015") or "step_00000015" in str(directory):
            (Path(str(directory).split("step_00000015")[0]) / "step_00000015" / "part").write_bytes(
                b"x" * 1000
            )
            raise OSError(errno.ENOSPC, "No space left on device")

    if async_save:
        real = dcp.save
        monkeypatch.setattr(
            dcp,
            "save",
            lambda state, checkpoint_id, **kw: (
                full_disk(checkpoint_id),
                real(state, checkpoint_id=checkpoint_id, **kw),
            )[1],
        )
    else:
        real_save = Strategy.save
        monkeypatch.setattr(
            Strategy,
            "save",
            lambda self, directory, *a, **kw: (
                full_disk(directory),
                real_save(self, directory, *a, **kw),
            )[1],
        )
    cfg = write_config({**FULL, "checkpoint.async_save": async_save})
    ck = tmp_path / "runs/tiny/checkpoints"
    assert main(["--config", str(cfg)]) == 75
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "step_00000015: checkpoint not saved: No space left on device" in err[0]
    assert " free on " in err[0] and "resumes from step_00000010" in err[0]
    assert not (ck / "step_00000015").exists()
    assert (ck / "latest").read_text() == "step_00000010"
    monkeypatch.undo()  # space is back
    assert main(["--config", str(cfg)]) == 0
    assert metrics(tmp_path / "runs/tiny") == straight


def test_a_write_the_os_refuses_is_reported_and_the_run_resumes(write_config, tmp_path, straight):
    """A real write failure from the kernel, in torch's own zip writer (which raises a C++
    RuntimeError, not an OSError): files may not grow past 200 kB, a checkpoint is larger."""
    import resource

    cfg = write_config(FULL)
    run(cfg, "trainer.max_steps=10")  # steps 5 and 10 saved with room to spare

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "src.main", "--config", str(cfg)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )
    ck = tmp_path / "runs/tiny/checkpoints"
    assert out.returncode == 75, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "step_00000015: checkpoint not saved" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (ck / "step_00000015").exists() and (ck / "latest").read_text() == "step_00000010"
    run(cfg)
    assert _losses(tmp_path / "runs/tiny") == _losses(tmp_path / "runs/straight")


def test_a_disk_short_of_space_is_warned_about_before_a_save_fails(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from src.core.checkpoint import folder_size

    mgr = CheckpointManager(CheckpointConfig(), tmp_path / "ck", SingleDeviceStrategy())
    model = torch.nn.Linear(64, 64)
    mgr.save(1, 0, model, None, {}, {})
    size = folder_size(tmp_path / "ck/step_00000001")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * size, 9 * size, size))
    with pytest.warns(UserWarning, match="free, a checkpoint takes .*the next saves may fail"):
        mgr.save(2, 0, model, None, {}, {})


def test_a_program_error_during_a_save_keeps_its_traceback(write_config, tmp_path, monkeypatch):
    """A bug raised while saving is no full disk, even when its message says 'write': it goes
    on as it is (traceback, exit 1), not as exit 75 'try again later'."""
    from src.distributed.base import Strategy
    from src.main import main

    def broken(self, directory, *a, **kw):
        raise ValueError("cannot write a tensor of this layout")

    monkeypatch.setattr(Strategy, "save", broken)
    with pytest.raises(ValueError, match="cannot write a tensor"):
        main(["--config", str(write_config(FULL))])
    assert not list((tmp_path / "runs/tiny/checkpoints").glob("step_*"))


def test_write_failures_are_told_by_type_and_errno():
    import errno

    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    from src.core.checkpoint import is_write_failure

    full = OSError(errno.ENOSPC, "No space left on device")
    disk = [
        full,
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        OSError(errno.EFBIG, "File too large"),
        OSError(errno.EIO, "Input/output error"),
        SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        CheckpointException("save", {0: (full, []), 1: (full, [])}),
    ]
    wrapped = RuntimeError("the engine could not save")
    wrapped.__cause__ = full
    disk.append(wrapped)
    program = [
        ValueError("cannot write a tensor"),
        RuntimeError("write barrier broken"),
        TypeError("write() argument must be str"),
        KeyError("write"),
        OSError(errno.ENOENT, "No such file or directory"),
        SafetensorError("Error while serializing: a tensor is shared (write it once)"),
        CheckpointException("save", {0: (full, []), 1: (ValueError("bug"), [])}),
    ]
    assert [is_write_failure(e) for e in disk] == [True] * len(disk)
    assert [is_write_failure(e) for e in program] == [False] * len(program)
