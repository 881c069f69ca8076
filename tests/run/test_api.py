"""The Python API: from a file, a dict or plain PyTorch objects; fit, evaluate, predict."""

import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from helpers import metrics

from src import Experiment, UserError

EXTENDING = (ROOT / "docs/extending.md").read_text()


def fresh(script: str, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
            "HOME": str(cwd),
            "OMP_NUM_THREADS": "1",
        },
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_the_docs_example_runs_in_a_fresh_interpreter_and_resumes(tmp_path):
    code = re.search(r"```python\n# api_example.py\n(.*?)```", EXTENDING, re.S).group(1)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    first = fresh(code, tmp_path).stdout
    cnn = float(re.search(r"^cnn (\S+)", first, re.M).group(1))
    mlp = float(re.search(r"^mlp (\S+)", first, re.M).group(1))
    assert cnn > 0.9 and mlp > 0.8
    logged = [r for r in metrics(tmp_path / "experiments/exp001-api") if "val/accuracy" in r]
    assert logged[-1]["val/accuracy"] == cnn  # evaluate() gives what the run logged
    again = fresh(code, tmp_path).stdout  # the same script resumes both finished runs
    assert "resumed at step 100" in again and "resumed at step 210" in again
    assert f"cnn {cnn}" in again and f"mlp {mlp}" in again


def test_from_dict_needs_no_other_import_and_matches_the_command_line(tmp_path, cli):
    d = {
        "name": "d",
        "model": {"type": "mlp", "hidden": [32]},
        "task": {"type": "classification"},
        "trainer": {"max_steps": 20},
        "logging": {"root": str(tmp_path / "api"), "loggers": ["jsonl"]},
    }
    fresh(
        f"from src import Experiment\nExperiment.from_dict({d!r}).fit()\n"
        "from src.core.config import ExperimentConfig\nfrom src.run.experiment import build\n"
        f"build(ExperimentConfig.model_validate({{**{d!r}, 'name': 'v'}}))\n",
        tmp_path,
    )
    cfg = tmp_path / "d.yaml"
    import yaml

    cfg.write_text(
        yaml.safe_dump({**d, "logging": {**d["logging"], "root": str(tmp_path / "cli")}})
    )
    assert cli("--config", str(cfg)).returncode == 0
    assert metrics(tmp_path / "api/d") == metrics(tmp_path / "cli/d")


def test_bad_input_raises_the_one_line_error(tmp_path):
    with pytest.raises(
        UserError,
        match=r"<dict>: trainer.max_step: unknown key; did you mean "
        r"'max_steps'",
    ):
        Experiment.from_dict(
            {
                "name": "x",
                "model": {"type": "mlp"},
                "task": {"type": "classification"},
                "trainer": {"max_step": 3},
            }
        )


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
        self.out = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.out(self.body(x))


def smoothed_loss(outputs, target):
    return torch.nn.functional.cross_entropy(outputs, target, label_smoothing=0.1)


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    return torch.utils.data.TensorDataset(x[:1400], y[:1400]), torch.utils.data.TensorDataset(
        x[1400:], y[1400:]
    )


def plain(tmp_path, name: str, **config):
    torch.manual_seed(0)
    train, val = digits()
    loader = torch.utils.data.DataLoader(train, batch_size=50, shuffle=True)
    cfg = {
        "trainer": {"max_steps": 40, "log_every": 5, "eval_every_n_steps": 20},
        "checkpoint": {"every_n_steps": 10},
        "callbacks": [{"type": "ema", "decay": 0.9}],
        "logging": {"root": str(tmp_path), "loggers": ["jsonl"]},
        "optimizer": {
            "type": "adamw",
            "lr": 3e-3,
            "groups": [{"match": r"^model\.out\.", "lr_mult": 2.0}],
        },
        **config,
    }
    return Experiment.from_modules(Net(), loader, val, smoothed_loss, name=name, config=cfg)


def test_a_plain_module_trains_with_callbacks_checkpoints_and_resumes_exactly(tmp_path):
    whole = plain(tmp_path, "whole")
    final = whole.fit()
    assert final["val/accuracy"] > 0.7
    assert whole.cfg.data.batch_size == 50  # the DataLoader's batch size
    assert whole.cfg.task["loss"] == f"{__name__}.smoothed_loss"
    assert (tmp_path / "whole/checkpoints/step_00000040/COMMIT").exists()

    stopped = plain(
        tmp_path,
        "stopped",
        callbacks=[
            {"type": "ema", "decay": 0.9},
            {"type": "signal_at_step", "step": 25, "signum": int(signal.SIGINT)},
        ],
    )
    with pytest.raises(SystemExit):
        stopped.fit()
    resumed = plain(tmp_path, "stopped")
    timing = {"train/samples_per_sec"}
    assert {k: v for k, v in resumed.fit().items() if k not in timing} == {
        k: v for k, v in final.items() if k not in timing
    }
    for k, v in whole.task.state_dict().items():
        assert torch.equal(resumed.task.state_dict()[k], v), k

    out = resumed.predict()["outputs"]
    _, val = digits()
    labels = np.asarray([int(y) for _, y in val])
    assert out.shape == (397, 10)
    acc = float((out.argmax(1) == labels).mean())
    ema_eval = resumed.evaluate()["val/accuracy"]
    assert abs(acc - ema_eval) < 0.05  # evaluation uses the EMA weights, predict the raw ones


def test_evaluate_before_fit_loads_the_latest_checkpoint(tmp_path):
    trained = plain(tmp_path, "e")
    final = trained.fit()
    again = plain(tmp_path, "e")
    assert again.evaluate()["val/accuracy"] == pytest.approx(trained.evaluate()["val/accuracy"])
    assert again.predict()["outputs"].shape == (397, 10)
    assert final["val/loss"] > 0


def test_a_run_of_objects_from_another_process_says_so(tmp_path, cli):
    plain(tmp_path, "o", trainer={"max_steps": 5}).fit()
    out = cli("--config", str(tmp_path / "o/config.yaml"))
    assert out.returncode == 2
    assert "is a Python object given to the Python API" in out.stderr
    assert "Traceback" not in out.stderr
