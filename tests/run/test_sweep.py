"""sweep: the space is checked before any trial; a grid runs its product; trials are ordinary runs;
a killed sweep continues to its budget; processes and ranks share one study; best.yaml retrains
the best trial to the same metric."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, make_config
from helpers import metrics, torchrun

from src.main import main


def sweep_file(
    tmp: Path, changes: dict | None = None, experiment: dict | None = None, name: str = "s"
) -> Path:
    """A sweep over the tiny MLP config (20 steps, evaluated every 10); a change to None
    removes that key."""
    exp = make_config(tmp, {"trainer.eval_every_n_steps": 10, **(experiment or {})})
    data = {
        "name": name,
        "experiment": exp.name,
        "metric": "val/accuracy",
        "method": "random",
        "trials": 3,
        "space": {
            "optimizer.lr": {"loguniform": [1e-3, 3e-2]},
            "model.hidden": {"choice": [[16], [32, 16]]},
        },
    }
    data.update(changes or {})
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def rows(tmp: Path, name: str = "s") -> list[dict]:
    with open(tmp / "runs" / name / "trials.csv") as f:
        return list(csv.DictReader(f))


def sweep_cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "src.main", "sweep", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


# ------------------------------------------------------------------ the space, before any trial

BAD = [
    (
        {"space": {"optimizer.lrr": {"loguniform": [1e-3, 1e-2]}}},
        "space.optimizer.lrr = 0.001: optimizer.lrr: unknown key; did you mean 'lr'?",
    ),
    (
        {"space": {"data.batch_size": {"choice": [16, 0]}}},
        "space.data.batch_size = 0: data.batch_size: Input should be greater than 0",
    ),
    (
        {"space": {"optimizer.lr": {"uniform": [0.1, 0.01]}}},
        "space.optimizer.lr: uniform: low 0.1 must be below high 0.01",
    ),
    (
        {"space": {"optimizer.lr": {"uniform": [0.1, 0.2], "choice": [1]}}},
        "space.optimizer.lr: give exactly one of uniform, loguniform, int, choice",
    ),
    (
        {"space": {"optimizer.lr": {"loguniform": [0.0, 0.1]}}},
        "space.optimizer.lr: loguniform: a log scale needs low > 0",
    ),
    ({"space": {"optimizer.lr": {"normal": [0, 1]}}}, "space.optimizer.lr.normal: unknown key"),
    ({"space": {"model.hidden": {"choice": []}}}, "space.model.hidden: choice: the list is empty"),
    ({"space": {"model.hidden": {"choice": [[16], [16]]}}}, "repeats a value"),
    ({"method": "grid"}, "space.optimizer.lr: method grid needs finite axes"),
    ({"trials": None}, "trials: required for method random"),
    (
        {"pruner": {"type": "median", "warmup": 3}},
        "pruner.warmup: not an option of MedianPruner (options: n_startup_trials, n_warmup_steps",
    ),
    ({"pruner": {"type": "hyperbnd"}}, "pruner.type: Input should be 'none', 'median'"),
    ({"sampler": {"n_startup": 3}, "method": "tpe"}, "sampler.n_startup: not an option of TPE"),
    ({"direction": "up"}, "direction: Input should be 'maximize' or 'minimize'"),
    (
        {"method": "grid", "sampler": {"seed": 1}, "space": {"optimizer.lr": {"choice": [0.01]}}},
        "sampler: a grid takes no sampler options",
    ),
    ({"storage": "nosuchdb://x/y"}, "storage: cannot open 'nosuchdb://x/y'"),
    ({"experiment": "nothere.yaml"}, "nothere.yaml: config file not found"),
]


@pytest.mark.parametrize("changes,line", BAD, ids=[b[1][:40] for b in BAD])
def test_a_bad_sweep_is_one_line_exit_2_and_writes_nothing(changes, line, tmp_path, capsys):
    path = sweep_file(tmp_path, changes)
    assert main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0], err
    assert not (tmp_path / "runs").exists()


def test_every_problem_of_the_space_at_once(tmp_path, capsys):
    path = sweep_file(
        tmp_path,
        {
            "space": {
                "optimizer.lrr": {"uniform": [0.1, 0.2]},
                "model.dropout": {"uniform": [0.0, 1.5]},
                "model.hidden": {"choice": [[16], "wide"]},
            }
        },
    )
    assert main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "space.optimizer.lrr = 0.1" in err and "space.model.dropout = 1.5" in err
    assert 'space.model.hidden = "wide"' in err


def test_a_sweep_file_given_to_the_training_command_says_how_to_run_it(tmp_path, capsys):
    path = sweep_file(tmp_path)
    assert main(["--config", str(path)]) == 2
    assert (
        f"is a sweep file; run it with python -m src.main sweep --config {path}"
        in capsys.readouterr().err
    )


def test_status_of_a_sweep_that_never_ran(tmp_path, capsys):
    assert main(["sweep", "--config", str(sweep_file(tmp_path)), "--status"]) == 2
    assert "no study here yet" in capsys.readouterr().err


def test_a_metric_the_run_does_not_log_stops_the_sweep_naming_those_it_does(tmp_path, capsys):
    path = sweep_file(tmp_path, {"metric": "val/acc"})
    assert main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'val/acc' is not among" in err and "val/accuracy" in err


# ------------------------------------------------------------------ trials


def test_a_grid_runs_exactly_the_product_of_its_axes(tmp_path, capsys):
    path = sweep_file(
        tmp_path,
        {
            "method": "grid",
            "trials": 50,
            "space": {
                "optimizer.lr": {"choice": [0.001, 0.01, 0.03]},
                "model.hidden": {"choice": [[16], [32, 16]]},
            },
        },
        {"trainer.max_steps": 4},
    )
    assert main(["sweep", "--config", str(path)]) == 0
    got = rows(tmp_path)
    assert [r["state"] for r in got] == ["complete"] * 6
    pairs = {(float(r["optimizer.lr"]), r["model.hidden"]) for r in got}
    assert pairs == {(lr, h) for lr in (0.001, 0.01, 0.03) for h in ("[16]", "[32, 16]")}
    out = capsys.readouterr().out
    assert "6 of 6 trials" in out


def test_each_trial_is_an_ordinary_run_and_best_yaml_retrains_the_best_one(tmp_path, capsys):
    path = sweep_file(tmp_path, {"trials": 2})
    assert main(["sweep", "--config", str(path)]) == 0
    sweep_dir = tmp_path / "runs" / "s"
    got = rows(tmp_path)
    assert len(got) == 2 and all(r["state"] == "complete" for r in got)
    for r in got:  # the trial's own parameters are in its own config, and it kept one checkpoint
        cfg = yaml.safe_load((sweep_dir / r["run"] / "config.yaml").read_text())
        assert cfg["optimizer"]["lr"] == float(r["optimizer.lr"])
        assert json.dumps(cfg["model"]["hidden"]) == r["model.hidden"]
        assert len(list((sweep_dir / r["run"] / "checkpoints").glob("step_*"))) == 1
        assert (sweep_dir / r["run"] / "log.txt").is_file()  # its own library log
        assert "done     step 20 of 20" in (sweep_dir / r["run"] / "console.txt").read_text()
        assert metrics(sweep_dir / r["run"])[-1]["val/accuracy"] == float(r["val/accuracy"])
    for plot in ("history", "parallel", "intermediate", "importances"):
        assert (sweep_dir / f"plot_{plot}.png").stat().st_size > 1000
    best = max(got, key=lambda r: float(r["val/accuracy"]))
    assert main(["--config", str(sweep_dir / "best.yaml")]) == 0
    again = metrics(tmp_path / "runs" / "s-best")
    trial = metrics(sweep_dir / best["run"])
    assert again[-1] == trial[-1]  # every metric of the last evaluation, to the bit
    capsys.readouterr()
    assert main(["sweep", "--config", str(path), "--status"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 trials" in out and f"best     trial {best['number']}" in out


def test_a_pruned_trial_stops_early_and_is_marked_pruned(tmp_path):
    path = sweep_file(tmp_path, {"trials": 2, "pruner": {"type": "threshold", "lower": 2.0}})
    assert main(["sweep", "--config", str(path)]) == 0
    got = rows(tmp_path)
    assert [r["state"] for r in got] == ["pruned", "pruned"]
    assert [int(r["steps"]) for r in got] == [10, 10]  # stopped at the first evaluation of 20


def test_cli_overrides_go_to_the_sweep_or_to_every_trial(tmp_path):
    path = sweep_file(tmp_path)
    assert main(["sweep", "--config", str(path), "trials=1", "trainer.max_steps=10"]) == 0
    got = rows(tmp_path)
    assert len(got) == 1 and got[0]["steps"] == "10"


# ------------------------------------------------------------------ interrupted sweeps


@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["kill-9", "sigterm", "sigint"]
)
def test_a_killed_sweep_run_again_reaches_its_budget_without_duplicates(sig, tmp_path):
    path = sweep_file(
        tmp_path,
        {"trials": 3},
        {
            "trainer.max_steps": 400,
            "trainer.eval_every_n_steps": 100,
            "checkpoint.every_n_steps": 20,
        },
    )
    proc = sweep_cli("--config", str(path))
    second = tmp_path / "runs" / "s" / "trial_1" / "checkpoints"
    deadline = time.time() + 120
    while not (second.exists() and any(second.glob("step_*/COMMIT"))):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 128 + sig), out
    again = sweep_cli("--config", str(path))
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    got = rows(tmp_path)
    assert [r["state"] for r in got] == ["complete"] * 3, got
    assert len({r["number"] for r in got}) == 3 and len({r["run"] for r in got}) == 3
    retry = next(r for r in got if r["run"] == "trial_1")
    assert retry["retry_of"] == "1" and retry["number"] != "1"
    log = (tmp_path / "runs" / "s" / "trial_1" / "console.txt").read_text()
    assert "resumed from" in log  # from its checkpoint, not from the start
    assert int(retry["steps"]) == 400


# ------------------------------------------------------------------ many processes


def test_two_sweep_commands_share_one_sqlite_study(tmp_path):
    path = sweep_file(tmp_path, {"trials": 6}, {"trainer.max_steps": 300})
    first = sweep_cli("--config", str(path))
    started = tmp_path / "runs" / "s" / "trial_0"
    deadline = time.time() + 120
    while not started.exists():  # the second joins a study the first is working on
        assert first.poll() is None and time.time() < deadline, first.stdout.read()
        time.sleep(0.05)
    second = sweep_cli("--config", str(path))
    outs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    got = rows(tmp_path)
    assert len(got) == 6 and all(r["state"] == "complete" for r in got)
    assert len({r["run"] for r in got}) == 6
    import optuna

    study = optuna.load_study(
        study_name="s", storage=f"sqlite:///{tmp_path / 'runs' / 's' / 'study.db'}"
    )
    pids = {t.user_attrs["pid"] for t in study.trials if t.state.name == "COMPLETE"}
    assert pids == {first.pid, second.pid}, outs  # both commands ran trials
    assert sum(t.state.name != "FAIL" for t in study.trials) == 6


def test_workers_run_trials_in_parallel_processes(tmp_path):
    path = sweep_file(tmp_path, {"trials": 4}, {"trainer.max_steps": 60})
    proc = sweep_cli("--config", str(path), "--workers", "2")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    got = rows(tmp_path)
    assert len(got) == 4 and all(r["state"] == "complete" for r in got)
    assert "4 of 4 trials" in out


def test_distributed_trials_use_the_same_parameters_on_every_rank(tmp_path):
    path = sweep_file(
        tmp_path,
        {"trials": 3, "pruner": {"type": "threshold", "lower": 2.0}},
        {"strategy": {"type": "ddp"}},
    )
    out = torchrun(2, "sweep", "--config", str(path)).stdout
    seen: dict[str, dict[int, str]] = {}
    for line in out.splitlines():
        if line.startswith("rank ") and " trial " in line:
            rank, rest = line[5:].split(" trial ", 1)
            number, values = rest.split(": ", 1)
            seen.setdefault(number, {})[int(rank)] = values
    assert len(seen) == 3 and all(set(v) == {0, 1} for v in seen.values()), out
    assert all(v[0] == v[1] for v in seen.values())
    got = rows(tmp_path)
    assert [r["state"] for r in got] == ["pruned"] * 3  # no rank left waiting


def test_an_experiment_config_given_to_sweep_says_what_a_sweep_file_is(tmp_path, capsys):
    exp = make_config(tmp_path)
    assert main(["sweep", "--config", str(exp)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {exp}: is an experiment config, not a sweep file; a sweep file names it "
        "(experiment: ...) with a metric and a space, as configs/sweep_exp001.yaml does"
    )
    path = sweep_file(tmp_path, {"experiment": None})
    assert main(["sweep", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: experiment: required but not given"


def test_the_budget_counts_running_trials_and_a_dead_owners_trial_is_retried_in_its_folder(
    tmp_path,
):
    """What another process left in the study: a trial running in a live process counts toward
    the budget; one whose process is gone is failed and asked again, with its parameters and its
    run folder."""
    import socket

    from src.run.sweep import Sweep
    from src.run.sweep_config import load_sweep
    from src.run.sweep_study import open_study

    path = sweep_file(tmp_path, {"trials": 2})
    sweep, experiment, overrides = load_sweep(path)
    sweep_dir = tmp_path / "runs" / "s"
    study = open_study(sweep, sweep_dir, create=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (1, dead.pid):  # pid 1 is alive: it is not ours, so it stays running
        t = study.ask()
        t.suggest_float("optimizer.lr", 1e-3, 3e-2, log=True)
        t.suggest_categorical("model.hidden", ["[16]", "[32, 16]"])
        t.set_user_attr("host", socket.gethostname())
        t.set_user_attr("pid", pid)
        t.set_user_attr("run", f"trial_{t.number}")
    driver = Sweep(sweep, study, experiment, overrides, sweep_dir, [])
    job = driver._next()
    assert job is not None and job["run"] == "trial_1" and job["resumes"] == 1
    lost = study.trials[1]
    assert lost.state.name == "FAIL"
    assert job["params"]["optimizer.lr"] == lost.params["optimizer.lr"]
    driver.study.tell(job["trial"], 0.5)
    assert driver._next() is None  # trial 0 (running elsewhere) and the retry make 2


def test_an_interrupted_grid_point_runs_again_in_its_folder_and_the_grid_stays_exact(tmp_path):
    import socket

    from src.run.sweep_config import load_sweep
    from src.run.sweep_study import grid_points, open_study

    path = sweep_file(
        tmp_path,
        {
            "method": "grid",
            "trials": None,
            "space": {
                "optimizer.lr": {"choice": [0.001, 0.01]},
                "model.hidden": {"choice": [[16], [32, 16]]},
            },
        },
        {"trainer.max_steps": 4},
    )
    sweep, _, _ = load_sweep(path)
    study = open_study(sweep, tmp_path / "runs" / "s", create=True)
    points = grid_points(sweep)
    assert len(points) == 4
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study.enqueue_trial(points[2])  # a point whose process died while it trained
    t = study.ask()
    t.suggest_categorical("optimizer.lr", [0.001, 0.01])
    t.suggest_categorical("model.hidden", ["[16]", "[32, 16]"])
    for k, v in {"host": socket.gethostname(), "pid": dead.pid, "run": "trial_0"}.items():
        t.set_user_attr(k, v)
    assert main(["sweep", "--config", str(path)]) == 0
    got = rows(tmp_path)
    assert [r["state"] for r in got] == ["complete"] * 4
    assert {(float(r["optimizer.lr"]), r["model.hidden"]) for r in got} == {
        (lr, h) for lr in (0.001, 0.01) for h in ("[16]", "[32, 16]")
    }
    retry = next(r for r in got if r["retry_of"] == "0")
    assert retry["run"] == "trial_0"
    assert (float(retry["optimizer.lr"]), retry["model.hidden"]) == (
        points[2]["optimizer.lr"],
        points[2]["model.hidden"],
    )
