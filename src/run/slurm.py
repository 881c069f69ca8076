"""SLURM: ``python -m src.main submit --config C [overrides] [--dry-run] [--wait]``, and what a run
does inside the job it submitted.

``submit`` validates the config, writes ``experiments/<name>/slurm/job.sbatch`` and the resolved
config beside it (``config.yaml``: the job runs exactly what was submitted, whatever happens to
the YAML file later), submits it with ``sbatch`` and prints the job id, its log and the commands
to follow or cancel it. Inside the job, each node runs one ``srun`` task: ``torchrun`` with a c10d
rendezvous on the allocation's first host (``--rdzv-id`` the job id, a port derived from it), or
with ``slurm.launcher: srun`` one task per process, which reads its rank from SLURM's variables.

Time limits and preemption: the job asks SLURM for ``SIGUSR1`` ``signal_grace_s`` before its time
limit (to the batch shell: torchrun would not pass it on to its workers); the shell sends SIGTERM
to every task of the job (``scancel --signal=TERM``), as a preemption or ``scancel --signal=TERM``
does. On SIGTERM every rank finishes its step and the checkpoint is committed (the trainer's
contract); rank 0 then requeues the job (``scontrol requeue``, at most ``max_requeues`` times),
which resumes from that checkpoint. A run that finishes, or stops on bad input, is never requeued.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from src.core.errors import ArgumentParser, ConfigError, UserError
from src.distributed.launch import PORT_BASE

REQUEUES = "TESSERA_SLURM_MAX_REQUEUES"  # set in the jobs submit writes: the run may requeue


def _sbatch_lines(s, name: str, log: Path, array: int = 0) -> list[str]:
    tasks = s.processes_per_node
    lines = [
        f"--job-name={name}",
        f"--nodes={s.nodes}",
        f"--ntasks-per-node={tasks if s.launcher == 'srun' else 1}",
        f"--output={log}",
        "--open-mode=append",  # a requeued job appends to the same log
        "--requeue",
        f"--signal=B:USR1@{s.signal_grace_s}",
    ]
    if array:
        lines.append(f"--array=0-{array - 1}")
    if s.cpus_per_task:
        lines.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.gpus_per_node:
        lines.append(f"--gpus-per-node={s.gpus_per_node}")
    for key in ("mem", "time", "partition", "account", "qos"):
        value = getattr(s, key)
        if value is not None:
            lines.append(f"--{key}={value}")
    lines += [line.strip().removeprefix("#SBATCH").strip() for line in s.sbatch]
    return lines


def _launch(s, args: str) -> str:
    """The srun line: torchrun per node with a c10d rendezvous, or one task per process."""
    tasks = s.processes_per_node
    python = shlex.quote(sys.executable)
    if s.launcher == "torchrun" and s.nodes * tasks > 1:
        return (
            f"srun --ntasks-per-node=1 --kill-on-bad-exit=0 {python} -m torch.distributed.run "
            f'--nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={tasks} --rdzv-backend=c10d '
            '--rdzv-endpoint="$head:$port" --rdzv-id="$SLURM_JOB_ID" '
            f"-m src.main {args}"
        )
    return f"srun --kill-on-bad-exit=0 {python} -m src.main {args}"


def job_script(cfg, config_path: Path, log: Path, root: Path) -> str:
    """The batch script of a run: resources, the launch, the time-limit signal's handling."""
    args = f"--config {shlex.quote(str(config_path))}"
    what = (
        f"runs {config_path}\n# (the resolved config, saved when the job was submitted). "
        "Resubmitting resumes the run."
    )
    return _script(cfg.slurm, cfg.name, log, root, _launch(cfg.slurm, args), what)


def sweep_script(s, name: str, log: Path, root: Path, sweep_args: list[str], workers: int) -> str:
    """A job array of ``workers`` sweep workers on one study (its storage is shared)."""
    args = (
        " ".join(shlex.quote(a) for a in ["sweep", *sweep_args])
        + ' --worker "$SLURM_ARRAY_TASK_ID"'
    )
    one = s.model_copy(update={"nodes": 1, "tasks_per_node": 1, "launcher": "srun"})
    what = f"{workers} workers of the sweep {name}, one per array task, on its study"
    return _script(one, name, log, root, _launch(one, args), what, array=workers)


def _script(s, name: str, log: Path, root: Path, launch: str, what: str, array: int = 0) -> str:
    grace = s.signal_grace_s
    header = "\n".join(f"#SBATCH {line}" for line in _sbatch_lines(s, name, log, array))
    setup = "\n".join(s.setup)
    return f"""#!/bin/bash
{header}
# Written by `python -m src.main submit`: {what}
cd {shlex.quote(str(root))}
{setup}
export {REQUEUES}={s.max_requeues}
export PYTHONUNBUFFERED=1
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_BASE}))
attempt=$((${{SLURM_RESTART_COUNT:-0}} + 1))
echo "slurm    job $SLURM_JOB_ID, attempt $attempt of {s.max_requeues + 1}, on $SLURM_JOB_NODELIST"
# {grace} s before the time limit every task gets SIGTERM: it finishes its step, saves, and rank 0
# requeues the job. Two clocks say when: this shell's own (from the job's end time) and SLURM's
# SIGUSR1 (--signal), whichever comes first; a SIGUSR1 long before the end (SLURM sends one to
# some jobs as they start) is ignored.
end=$(date -d "$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)" +%s 2>/dev/null || echo 0)
stopping=""
stop_tasks() {{
  [ -n "$stopping" ] && return
  stopping=1
  echo "slurm    time limit in {grace} s: stopping every task at its next step"
  scancel --signal=TERM "$SLURM_JOB_ID"
}}
on_usr1() {{
  if [ "$end" -gt 0 ] && [ $(( end - $(date +%s) )) -gt {grace + 15} ]; then
    echo "slurm    ignored an early SIGUSR1"
    return
  fi
  stop_tasks
}}
trap on_usr1 USR1
trap stop_tasks USR2
timer=""
if [ "$end" -gt 0 ]; then
  wait_s=$(( end - $(date +%s) - {grace} ))
  ( sleep $(( wait_s > 0 ? wait_s : 0 )); kill -USR2 $$ ) &
  timer=$!
fi
{launch} &
pid=$!
wait "$pid"; status=$?
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done
[ -n "$timer" ] && kill "$timer" 2>/dev/null
exit "$status"
"""


def _resolved(config: str, overrides: list[str], imports: list[str]):
    from src.run.experiment import prepare

    cfg, _ = prepare(config, overrides, imports)
    if cfg.slurm is None:
        from src.core.config import SlurmConfig

        cfg.slurm = SlurmConfig()
    return cfg


ACTIVE = {
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING",
}  # fmt: skip


def _job_state(job: str) -> tuple[Optional[str], Optional[str]]:
    """(state, exit code) of a job from ``scontrol``, (None, None) once SLURM forgot it. For a job
    array: an active state while any task is active, else COMPLETED only if every task is."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=False
    )
    if out.returncode != 0 or not out.stdout.strip():
        if "invalid job id" in (out.stderr + out.stdout).lower():
            return None, None  # ended long enough ago that SLURM forgot it
        return "UNREACHABLE", None  # slurmctld busy or restarting: ask again
    tasks = [
        dict(f.split("=", 1) for f in line.split() if "=" in f)
        for line in out.stdout.splitlines()
        if line.strip()
    ]
    for t in tasks:
        if t.get("JobState") in ACTIVE:
            return t.get("JobState"), t.get("ExitCode")
    for t in tasks:
        if t.get("JobState") != "COMPLETED":
            return t.get("JobState"), t.get("ExitCode")
    return "COMPLETED", tasks[-1].get("ExitCode")


def wait_for(job: str, poll: float = 2.0, patience: float = 600.0) -> tuple[str, str]:
    """Block until the job ends (requeues included): its last state and exit code. SLURM not
    answering for ``patience`` seconds in a row is an error."""
    last: tuple[Optional[str], Optional[str]] = (None, None)
    silent_since: Optional[float] = None
    while True:
        state, code = _job_state(job)
        if state is None:
            return last[0] or "UNKNOWN", last[1] or "?"
        if state == "UNREACHABLE":
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since > patience:
                raise UserError(
                    f"submit --wait: SLURM has not answered about job {job} for {patience:.0f} s"
                )
            time.sleep(poll)
            continue
        silent_since = None
        last = (state, code)
        if state not in ACTIVE:
            return state, code or "?"
        time.sleep(poll)


def main(argv: list[str]) -> int:
    p = ArgumentParser(
        prog="python -m src.main submit",
        description="Submit a run to SLURM as described by its config's slurm section.",
    )
    p.add_argument("--config", "-c", required=True, help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    p.add_argument("--wait", action="store_true", help="return when the job ends, with its state")
    p.add_imports()
    args = p.parse_intermixed_args(argv)
    from src.core.config import dump_config

    cfg = _resolved(args.config, args.overrides, args.imports)
    root = Path.cwd()
    run_dir = (Path(cfg.logging.root) / cfg.name).absolute()
    folder = run_dir / "slurm"
    config_path, script_path = folder / "config.yaml", folder / "job.sbatch"
    log = folder / "%j.out"
    script = job_script(cfg, config_path, log, root)
    if args.dry_run:
        print(script, end="")
        return 0
    job = submit_files(folder, {config_path: dump_config(cfg), script_path: script}, script_path)
    print(f"submitted job {job}: {cfg.name} ({cfg.slurm.nodes} node(s))")
    return _follow(job, folder / f"{job}.out", args.wait)


def submit_files(folder: Path, files: dict[Path, str], script: Path) -> str:
    """Write ``files`` and submit ``script`` with sbatch: the job id. If sbatch refuses, what
    was there is put back (nothing is left of this submission) and its message is the error."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("submit: sbatch not found on PATH (is this a SLURM login node?)")
    created = [d for d in (folder, *folder.parents) if not d.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    old = {p: p.read_bytes() for p in files if p.is_file()}
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    out = subprocess.run(
        [sbatch, "--parsable", str(script)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        for path in files:
            if path in old:
                path.write_bytes(old[path])
            else:
                path.unlink(missing_ok=True)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        message = " ".join((out.stderr or out.stdout).split()) or f"exit code {out.returncode}"
        raise UserError(f"submit: sbatch refused the job: {message}")
    return out.stdout.strip().split(";")[0]


def _follow(job: str, logfile: Path, wait: bool) -> int:
    print(f"log      {logfile}")
    print(f"follow   squeue -j {job}; tail -f {logfile}")
    print(f"cancel   scancel {job}")
    if not wait:
        return 0
    state, code = wait_for(job)
    print(f"ended    job {job}: {state}, exit code {code}")
    return 0 if state == "COMPLETED" else 1


def submit_sweep(
    base,
    sweep_name: str,
    sweep_dir: Path,
    sweep_args: list[str],
    workers: int,
    dry_run: bool,
    wait: bool,
) -> int:
    """``sweep --slurm``: the sweep's workers as one job array sharing the study's storage."""
    from src.core.config import SlurmConfig

    s = base.slurm or SlurmConfig()
    folder = sweep_dir.absolute() / "slurm"
    script = sweep_script(s, sweep_name, folder / "%A_%a.out", Path.cwd(), sweep_args, workers)
    if dry_run:
        print(script, end="")
        return 0
    job = submit_files(folder, {folder / "sweep.sbatch": script}, folder / "sweep.sbatch")
    print(f"submitted job array {job}: {workers} workers of sweep {sweep_name}")
    return _follow(job, folder / f"{job}_<task>.out", wait)


def banner() -> Optional[str]:
    """``requeued: attempt N of M`` for a run in a job that submit wrote and SLURM requeued."""
    if REQUEUES not in os.environ or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    n = int(os.environ["SLURM_RESTART_COUNT"]) + 1
    return f"requeued: attempt {n} of {int(os.environ[REQUEUES]) + 1} (job {os.environ.get('SLURM_JOB_ID')})"


def requeue_after_stop() -> None:
    """After the run stopped on SIGTERM with its checkpoint committed: rank 0 requeues the job
    (within max_requeues). Outside a job submit wrote, nothing."""
    job = os.environ.get("SLURM_JOB_ID")
    if REQUEUES not in os.environ or job is None or os.environ.get("RANK", "0") != "0":
        return
    done = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if done >= int(os.environ[REQUEUES]):
        print(
            f"slurm    not requeued: slurm.max_requeues ({os.environ[REQUEUES]}) reached",
            flush=True,
        )
        return
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if out.returncode == 0:
        print(f"slurm    requeued job {job}: it resumes from the checkpoint", flush=True)
    else:  # SLURM may be requeueing it already (scontrol requeue, a preemption)
        print(f"slurm    requeue: {' '.join((out.stderr or out.stdout).split())}", flush=True)
