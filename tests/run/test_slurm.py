"""SLURM: submit, time limits, preemption and multi-task jobs, against a real single-node cluster.

The ``cluster`` fixture starts Debian's munged, slurmctld and slurmd in the foreground with a
generated slurm.conf (``.ci/run`` installs the packages when they are missing); where that cannot
be done (no packages, not root) the cluster tests are skipped, saying why. Every outcome is read
from metrics.jsonl and compared with a direct run of the same config.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, port
from helpers import metrics

from src.core.config import slurm_seconds
from src.distributed.launch import first_host, slurm_env

SLOW_PLUGIN = '''
import time
from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS

@CALLBACKS.register("slow_steps")
class SlowSteps(Callback):
    """Each step takes at least `seconds` (the numbers do not change)."""
    def __init__(self, seconds: float):
        self.seconds = seconds
    def on_step_end(self, trainer, outputs):
        time.sleep(self.seconds)
'''

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")


def _why_no_cluster() -> str | None:
    missing = [
        d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()
    ]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; .ci/run installs it as root)"
    if os.geteuid() != 0:
        return "slurmd must run as root here"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@pytest.fixture(scope="module")
def cluster():
    """A real single-node SLURM cluster; yields the environment that points its clients at it."""
    why = _why_no_cluster()
    if why:
        pytest.skip(why)
    import tempfile

    # not under pytest's folder (mode 700): munged runs as the munge user and must reach its files
    base = Path(tempfile.mkdtemp(prefix="tessera-slurm-"))
    for d in ("state", "spool", "log", "munge"):
        (base / d).mkdir()
    os.chmod(base, 0o755)
    shutil.chown(base / "munge", "munge", "munge")
    os.chmod(base / "munge", 0o755)
    host = socket.gethostname().split(".")[0]
    sock = base / "munge" / "munge.socket"
    conf = base / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=tessera",
                # job ids (and the rendezvous ports derived from them) differ between the
                # clusters of two test workers on one host
                f"FirstJobId={1000 + port() % 9000 * 2}",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                f"SlurmctldPort={port()}",
                f"SlurmdPort={port()}",
                "AuthType=auth/munge",
                f"AuthInfo=socket={sock},cred_expire=10",  # a requeued job waits cred_expire
                f"StateSaveLocation={base}/state",
                f"SlurmdSpoolDir={base}/spool",
                f"SlurmctldPidFile={base}/slurmctld.pid",
                f"SlurmdPidFile={base}/slurmd.pid",
                f"SlurmctldLogFile={base}/log/slurmctld.log",
                f"SlurmdLogFile={base}/log/slurmd.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SwitchType=switch/none",
                "MpiDefault=none",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
                "JobCompType=jobcomp/none",
                "ReturnToService=2",
                "KillWait=30",
                "InactiveLimit=0",
                "MinJobAge=600",
                "JobRequeue=1",
                f"NodeName={host} CPUs={max(2, os.cpu_count() or 2)} State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge = subprocess.run(
        [
            "runuser", "-u", "munge", "--", _exe("munged"), f"--socket={sock}",
            f"--pid-file={base}/munge/munged.pid", f"--log-file={base}/munge/munged.log",
            f"--seed-file={base}/munge/seed",
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if munge.returncode != 0:
        pytest.skip(f"munged did not start: {munge.stderr.strip()}")
    daemons = [
        subprocess.Popen([_exe(d), "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                         stderr=open(base / "log" / f"{d}.err", "w"))
        for d in ("slurmctld", "slurmd")
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, check=False
            )
            if out.stdout.strip() == "idle":
                break
            if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
                logs = "".join(
                    (base / "log" / f).read_text()[-1500:] for f in ("slurmctld.err", "slurmd.err")
                )
                pytest.fail(
                    f"the SLURM node never became idle: {out.stdout!r} {out.stderr!r}\n{logs}"
                )
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, check=False)
        for d in daemons:
            d.send_signal(signal.SIGTERM)
        for d in daemons:
            try:
                d.wait(30)
            except subprocess.TimeoutExpired:
                d.kill()
        pid = base / "munge" / "munged.pid"
        if pid.is_file():
            try:
                os.kill(int(pid.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(base, ignore_errors=True)


BASE = {
    "name": "job",
    "seed": 0,
    "data": {"type": "digits", "val_fraction": 0.2, "batch_size": 64},
    "model": {"type": "mlp", "hidden": [64, 32]},
    "task": {"type": "classification"},
    "optimizer": {"type": "adamw", "lr": 3e-3},
    "scheduler": {"type": "constant"},
    "trainer": {
        "max_steps": 40,
        "log_every": 1,
        "eval_every_n_epochs": None,
        "eval_every_n_steps": 20,
    },
    "checkpoint": {"every_n_steps": 1000, "keep_last": 2},
    "logging": {"loggers": ["jsonl"]},
}


def _config(tmp_path: Path, name: str, changes: dict) -> Path:
    cfg = json.loads(json.dumps(BASE))
    cfg["name"] = name
    cfg["logging"]["root"] = str(tmp_path / "runs")
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _main(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "src.main", *args],
        cwd=ROOT,
        env={**(env or os.environ), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir) if "train/loss" in r}


def _val(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val/accuracy"] for r in metrics(run_dir) if "val/accuracy" in r}


def _same_run(direct: Path, job: Path, rel: float = 1e-5) -> None:
    a, b = _losses(direct), _losses(job)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for s in a:
        assert abs(a[s] - b[s]) <= rel * abs(a[s]), (s, a[s], b[s])
    assert _val(direct) == pytest.approx(_val(job), rel=rel)


def _steps_once(run_dir: Path) -> None:
    steps = [r["step"] for r in metrics(run_dir) if "train/loss" in r]
    assert len(steps) == len(set(steps)), "a step was trained twice"


def _job_id(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stderr
    return out.stdout.split("submitted job ", 1)[1].split(":")[0]


def _wait_for_step(run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and any(
            r.get("step", 0) >= step for r in metrics(run_dir)
        ):
            return
        time.sleep(0.5)
    raise AssertionError(f"{run_dir} never reached step {step}")


def _wait_end(job: str, env: dict) -> str:
    from src.run.slurm import wait_for

    os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # the test's own environment: restored after it
    return wait_for(job, poll=1.0)[0]


# ---------------------------------------------------------------- without a cluster


def test_srun_tasks_get_their_ranks_from_slurm():
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_NODELIST": "gpu[07-08],cpu1",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    }
    assert slurm_env(env) == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 1234),
    }
    assert slurm_env({**env, "RANK": "0"}) == {}  # torchrun's variables win
    assert slurm_env({**env, "SLURM_NTASKS": "1"}) == {}
    assert slurm_env({k: v for k, v in env.items() if k != "SLURM_STEP_ID"}) == {}  # batch shell
    assert first_host("node1") == "node1" and first_host("a[3,5-9]") == "a3"
    assert [slurm_seconds(t) for t in ("5", "2:30", "01:00:00", "1-02", "1-00:00:30")] == [
        300,
        150,
        3600,
        93600,
        86430,
    ]


def test_a_dry_run_prints_the_batch_script(tmp_path):
    cfg = _config(
        tmp_path,
        "dry",
        {
            "strategy": {"type": "ddp"},
            "slurm": {
                "nodes": 2, "gpus_per_node": 4, "time": "02:00:00", "partition": "gpu",
                "setup": ["module load cuda"], "sbatch": ["--exclusive"], "signal_grace_s": 300,
            },
        },
    )  # fmt: skip
    out = _main("submit", "--config", str(cfg), "--dry-run")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=02:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --exclusive",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "module load cuda",
        "--nproc-per-node=4 --rdzv-backend=c10d",
        '--rdzv-id="$SLURM_JOB_ID"',
    ):
        assert line in script, line
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "change, message",
    [
        ({"slurm": {"nodez": 2}}, "slurm.nodez: unknown key; did you mean 'nodes'?"),
        (
            {"slurm": {"time": "1", "signal_grace_s": 120}},
            "time 1 is not longer than signal_grace_s",
        ),
        ({"slurm": {"time": "soon"}}, "'soon' is not a SLURM time"),
    ],
)
def test_a_bad_slurm_section_is_one_line_and_submits_nothing(tmp_path, change, message):
    out = _main("submit", "--config", str(_config(tmp_path, "bad", change)))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr
    assert not (tmp_path / "runs").exists()


def test_no_sbatch_on_the_path_is_one_line(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    out = _main("submit", "--config", str(_config(tmp_path, "nosb", {})), env=env)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: submit: sbatch not found on PATH (is this a SLURM login node?)"
    )
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- against the cluster


def test_a_submitted_run_is_the_direct_run(cluster, tmp_path):
    cfg = _config(tmp_path, "plain", {})
    out = _main("submit", "--config", str(cfg), "--wait", env=cluster)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ended    job" in out.stdout and "COMPLETED" in out.stdout
    job = _job_id(out)
    log = (tmp_path / f"runs/plain/slurm/{job}.out").read_text()
    assert "done     step 40 of 40" in log and "requeued" not in log
    saved = yaml.safe_load((tmp_path / "runs/plain/slurm/config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 40 and saved["slurm"]["max_requeues"] == 3
    direct = _config(tmp_path, "direct", {})
    assert _main("--config", str(direct)).returncode == 0
    _same_run(tmp_path / "runs/direct", tmp_path / "runs/plain")


def test_sbatch_refusing_the_job_is_its_message_in_one_line(cluster, tmp_path):
    cfg = _config(tmp_path, "nopart", {"slurm": {"partition": "nonexistent"}})
    out = _main("submit", "--config", str(cfg), env=cluster)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: submit: sbatch refused the job:") and "partition" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_time_limit_checkpoints_requeues_and_resumes_exactly(cluster, tmp_path):
    """A one-minute limit with a 30 s grace on a run that needs longer: signalled, saved,
    requeued and resumed (as often as it takes); the final metrics are the direct run's and no
    step is trained twice."""
    (tmp_path / "slow_plugin.py").write_text(SLOW_PLUGIN)
    change = {
        "imports": [str(tmp_path / "slow_plugin.py")],
        "callbacks": [{"type": "slow_steps", "seconds": 0.4}],
        "trainer.max_steps": 150,
        "trainer.eval_every_n_steps": 50,
    }
    cfg = _config(
        tmp_path,
        "limited",
        {**change, "slurm": {"time": "1", "signal_grace_s": 30, "max_requeues": 5}},
    )
    out = _main("submit", "--config", str(cfg), "--wait", env=cluster)
    job = _job_id(out)
    log = (tmp_path / f"runs/limited/slurm/{job}.out").read_text()
    said = out.stdout + log
    assert "COMPLETED" in out.stdout, said
    assert "time limit in 30 s: stopping every task" in log, said
    assert "stopped by SIGTERM at step" in log and f"requeued job {job}" in log, said
    assert "slurm    requeued: attempt 2 of 6" in log and "done     step 150 of 150" in log, said
    _steps_once(tmp_path / "runs/limited")
    direct = _config(tmp_path, "direct", change)
    assert _main("--config", str(direct)).returncode == 0
    _same_run(tmp_path / "runs/direct", tmp_path / "runs/limited")


def test_preemption_by_sigterm_and_scontrol_requeue_lose_nothing(cluster, tmp_path):
    """`scancel --signal=TERM` mid-run (as a preemption signals), later `scontrol requeue`: each
    time the run saves at its step, comes back and goes on; the result is the direct run's."""
    (tmp_path / "slow_plugin.py").write_text(SLOW_PLUGIN)
    change = {
        "imports": [str(tmp_path / "slow_plugin.py")],
        "callbacks": [{"type": "slow_steps", "seconds": 0.2}],
        "trainer.max_steps": 120,
        "trainer.eval_every_n_steps": 40,
    }
    cfg = _config(tmp_path, "preempted", change)
    job = _job_id(_main("submit", "--config", str(cfg), env=cluster))
    run = tmp_path / "runs/preempted"
    _wait_for_step(run, 20)
    subprocess.run(["scancel", "--signal=TERM", job], env=cluster, check=True)
    _wait_for_step(run, 70)  # requeued, resumed, went on
    subprocess.run(["scontrol", "requeue", job], env=cluster, check=True)
    state = _wait_end(job, cluster)
    log = (run / f"slurm/{job}.out").read_text()
    assert state == "COMPLETED", log
    assert log.count("stopped by SIGTERM at step") == 2 and "attempt 3 of 4" in log, log
    _steps_once(run)
    direct = _config(tmp_path, "direct", change)
    assert _main("--config", str(direct)).returncode == 0
    _same_run(tmp_path / "runs/direct", run)


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_two_tasks_on_a_node_train_ddp_as_one_process_does(cluster, tmp_path, launcher):
    """tasks_per_node=2 under DDP (gloo): torchrun inside the job, or two srun tasks that take
    their ranks from SLURM's variables; the losses are the one-process run's."""
    change = {"strategy": {"type": "ddp"}, "trainer.max_steps": 20}
    cfg = _config(
        tmp_path,
        "ddp",
        {**change, "slurm": {"tasks_per_node": 2, "launcher": launcher, "cpus_per_task": 1}},
    )
    out = _main("submit", "--config", str(cfg), "--wait", env=cluster)
    job = _job_id(out)
    log = (tmp_path / f"runs/ddp/slurm/{job}.out").read_text()
    assert "COMPLETED" in out.stdout, log
    assert "world size 2" in log, log
    single = _config(tmp_path, "single", {"trainer.max_steps": 20})
    assert _main("--config", str(single)).returncode == 0
    _same_run(tmp_path / "runs/single", tmp_path / "runs/ddp", rel=1e-4)


def test_sigterm_while_starting_stops_at_once_with_143(tmp_path):
    """A job preempted while its run is still being built (a slow import here) stops at once,
    exit 128 + 15, as a stop during training does (the job then requeues), with nothing written."""
    marker = tmp_path / "importing"
    (tmp_path / "slow_import.py").write_text(
        f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(60)\n"
    )
    cfg = _config(tmp_path, "early", {"imports": [str(tmp_path / "slow_import.py")]})
    proc = subprocess.Popen(
        [sys.executable, "-m", "src.main", "--config", str(cfg)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:  # the config is being built
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM while starting; nothing to save" in err
    assert not (tmp_path / "runs").exists()


def test_a_sweep_submitted_as_a_job_array_runs_each_trial_once(cluster, tmp_path):
    """`sweep --slurm --workers 2`: two array tasks share the study's storage and complete its
    four trials exactly once between them."""
    import optuna

    exp = _config(tmp_path, "exp", {"trainer.max_steps": 30, "trainer.eval_every_n_steps": 30})
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "experiment": exp.name,
                "metric": "val/accuracy",
                "method": "random",
                "trials": 4,
                "space": {"optimizer.lr": {"loguniform": [1e-3, 3e-2]}},
            }
        )
    )
    out = _main("sweep", "--config", str(sweep), "--slurm", "--workers", "2", "--wait", env=cluster)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "submitted job array" in out.stdout and "COMPLETED" in out.stdout
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'runs/s/study.db'}")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 4 and len(study.trials) == 4
    assert len({t.user_attrs["run"] for t in done}) == 4
    assert len({t.user_attrs["pid"] for t in done}) == 2  # both array tasks ran trials


def test_a_sweep_dry_run_prints_the_array_and_creates_no_study(tmp_path):
    exp = _config(tmp_path, "exp", {})
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "experiment": exp.name,
                "metric": "val/accuracy",
                "trials": 4,
                "space": {"optimizer.lr": {"loguniform": [1e-3, 3e-2]}},
            }
        )
    )
    out = _main("sweep", "--config", str(sweep), "--slurm", "--workers", "3", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --array=0-2" in out.stdout and '--worker "$SLURM_ARRAY_TASK_ID"' in out.stdout
    assert not (tmp_path / "runs").exists()
    out = _main("sweep", "--config", str(sweep), "--dry-run")
    assert out.returncode == 2 and out.stderr.strip() == "error: --dry-run: only with --slurm"
