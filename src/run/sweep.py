"""Hyper-parameter sweeps: ``python -m src.main sweep --config configs/sweep_exp001.yaml``.

    python -m src.main sweep --config configs/sweep_exp001.yaml             # one process
    python -m src.main sweep --config configs/sweep_exp001.yaml --workers 2 # 2 trials at a time
    python -m src.main sweep --config configs/sweep_exp001.yaml trials=8 trainer.max_epochs=5
    torchrun --nproc_per_node 2 -m src.main sweep --config ...              # each trial on 2 ranks
    python -m src.main sweep --config configs/sweep_exp001.yaml --status    # the table so far

Optuna is the engine: its study lives in a database (``storage:``; SQLite in the sweep folder by
default), so every process that names the same study works on it, on this machine or another.
Each trial is an ordinary run folder ``<root>/<sweep>/trial_<k>/``.

A trial is counted once it has an outcome (complete, pruned, or failed on its own parameters)
or while it runs; the sweep stops asking when the count reaches the budget. A trial whose
process was stopped (SIGTERM/SIGINT: it saved a checkpoint first) or killed (a dead process on
this host, or no heartbeat for ``grace_s`` from another host) is not counted: the next ask
retries it with the same parameters in the same folder, so it resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

from src.core.errors import ArgumentParser, ConfigError, UserError
from src.run.sweep_config import SweepConfig, as_override, budget, check_space, load_sweep
from src.run.sweep_study import (
    check_sampler_and_pruner,
    grid_points,
    open_study,
    point_key,
    sqlite_file,
    storage_url,
    suggest,
)
from src.run.sweep_trials import (
    ERROR,
    HOST,
    INTERRUPTED,
    PID,
    RETRY_OF,
    RUN,
    STEPS,
    SURPLUS,
    THREADS,
    counted,
    interrupted,
)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m src.main sweep",
        description="Search hyper-parameters: run the trials a sweep file asks for.",
        epilog="Overrides: a sweep field (trials=8, method=random, "
        "pruner.type=median, storage=URL) changes the sweep; any other "
        "key.path=value applies to every trial's experiment.",
    )
    p.add_argument("--config", "-c", required=True, help="sweep YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--workers", type=int, help="trials run in parallel processes on this machine")
    p.add_argument("--status", action="store_true", help="print the table of the study and exit")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show each trial's own output (else kept in trial_<k>/console.txt)",
    )
    p.add_imports()
    p.add_argument(
        "--slurm",
        action="store_true",
        help="submit the workers (--workers, default 1) as a SLURM job array sharing the study; "
        "resources from the experiment's slurm section",
    )
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the batch script")
    p.add_argument("--wait", action="store_true", help="with --slurm: return when the array ends")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set for spawned workers
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides may follow --workers N
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers: expected a positive number, got {args.workers}")
    if (args.dry_run or args.wait) and not args.slurm:
        raise UserError(f"{'--dry-run' if args.dry_run else '--wait'}: only with --slurm")
    rank = int(os.environ.get("RANK", "0"))
    try:
        sweep, experiment, overrides = load_sweep(args.config, args.overrides)
        workers = args.workers or sweep.workers
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and workers > 1:
            raise UserError(
                "--workers: a sweep under a launcher runs each trial on all its "
                "ranks, one trial at a time; use one or the other"
            )
        from src.run.experiment import prepare

        base, _ = _quietly(lambda: prepare(str(experiment), overrides, args.imports))
        sweep_dir = Path(base.logging.root) / sweep.name
        if args.status:
            from src.run.sweep_report import print_table

            study = open_study(sweep, sweep_dir, create=False)
            print_table(study, sweep, sweep_dir)
            return 0
        if args.worker is None:  # workers were checked by the command that started them
            _quietly(
                lambda: check_space(sweep, Path(args.config), experiment, overrides, args.imports)
            )
        check_sampler_and_pruner(sweep)
        if args.slurm and args.dry_run:  # the batch script alone: no study is created
            from src.run.slurm import submit_sweep

            return submit_sweep(
                base, sweep.name, sweep_dir, _slurm_args(args), workers, True, False
            )
        # under a launcher, rank 0 alone talks to the study and tells the others
        study = (
            open_study(sweep, sweep_dir, create=True, worker=args.worker or 0)
            if rank == 0
            else None
        )
    except UserError as exc:
        exc.quiet = rank != 0
        raise
    if args.slurm and args.worker is None:
        from src.run.slurm import submit_sweep

        return submit_sweep(
            base, sweep.name, sweep_dir, _slurm_args(args), workers, False, args.wait
        )
    if workers > 1 and args.worker is None:
        return _spawn(argv, workers, study, sweep, sweep_dir)
    if args.worker is not None:
        import torch

        if "OMP_NUM_THREADS" not in os.environ:  # share the cores, do not oversubscribe them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    driver = Sweep(
        sweep,
        study,
        experiment,
        overrides,
        sweep_dir,
        args.imports,
        verbose=args.verbose,
        worker=args.worker,
    )
    try:
        code = driver.run()
    except SystemExit as exc:  # stopped by SIGTERM: the trial saved; a SLURM array task requeues
        if exc.code == 128 + signal.SIGTERM:
            from src.run.slurm import requeue_after_stop

            requeue_after_stop()
        raise
    if args.worker is None and driver.is_main:
        from src.run.sweep_report import print_table, write_outputs

        write_outputs(study, sweep, sweep_dir)
        print_table(study, sweep, sweep_dir)
    return code


def _slurm_args(args) -> list[str]:
    """What each array task of ``sweep --slurm`` runs the sweep with."""
    out = ["--config", str(Path(args.config).absolute()), *args.overrides]
    for module in args.imports:
        out += ["--import", module]
    return out


def _quietly(fn):
    """Hold what libraries print while a config is validated; dropped on a config error."""
    from src.core.console import held_output

    held = held_output()
    outcome = "drop"
    try:
        out = fn()
        outcome = "log"
        return out
    finally:
        held.release(outcome)


# ---------------------------------------------------------------- one process's part


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Sweep:
    """One process's part of a sweep: ask, run, tell, until the study has its trials."""

    def __init__(
        self,
        sweep: SweepConfig,
        study,
        experiment: Path,
        overrides: list[str],
        sweep_dir: Path,
        imports: list[str],
        verbose: bool = False,
        worker: Optional[int] = None,
    ):
        self.sweep, self.study, self.experiment = sweep, study, experiment
        self.overrides, self.sweep_dir, self.imports = overrides, sweep_dir, imports
        self.verbose, self.worker = verbose, worker
        self.budget = budget(sweep)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.is_main = self.rank == 0
        self.group = None  # the process group trials share under a launcher
        from src.run.sweep_report import Rows

        self.rows = Rows(sweep, sweep_dir, live=self.is_main and worker is None)

    # ------------------------------------------------------------ driver

    def run(self) -> int:
        if self.world > 1:
            self._join_group()
        in_step = False  # whether every rank leaves at the same point (may wait for the others)
        try:
            while True:
                job = self._next() if self.is_main else None
                job = self._broadcast(job)
                if job is None:
                    break
                self._run_trial(job)
            in_step = True
        except SystemExit:  # a stop signal: every rank stopped at the same step
            in_step = True
            raise
        finally:
            self.rows.close()
            if self.group is not None:
                self.group.teardown(in_step=in_step)
        return 0

    def _join_group(self) -> None:
        """Under a launcher, the trials of this sweep share one process group: rank 0 asks the
        study and sends every rank the trial's parameters, and the pruner's decisions."""
        from src.core.registry import STRATEGIES
        from src.run.experiment import prepare

        cfg, _ = _quietly(lambda: prepare(str(self.experiment), self.overrides, self.imports))
        if cfg.strategy["type"] == "single":
            raise ConfigError(
                f"strategy: a sweep under a launcher ({self.world} processes) "
                "needs a multi-process strategy (ddp, fsdp, deepspeed); got single"
            )
        self.group = group = STRATEGIES.build(cfg.strategy, "strategy")
        group.setup()

    def _broadcast(self, job):
        if self.world == 1:
            return job
        import torch.distributed as dist

        box = [None if job is None else {k: v for k, v in job.items() if k != "trial"}]
        dist.broadcast_object_list(box, src=0)
        if self.is_main or box[0] is None:
            return job
        return box[0]

    @contextlib.contextmanager
    def _study_lock(self):
        """Processes of this machine ask one at a time (the count, the recovery and the ask
        are then one step); processes of other machines rely on the surplus check."""
        db = sqlite_file(storage_url(self.sweep, self.sweep_dir))
        if db is None:
            yield
            return
        import fcntl

        with open(db.parent / ".study.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _next(self) -> Optional[dict]:
        """The next trial to run (its number, parameters and folder), or None: budget reached."""
        with self._study_lock():
            self._recover()
            trials = self.study.get_trials(deepcopy=False)
            waiting = any(t.state.name == "WAITING" for t in trials)  # a retry: the ask takes it
            if not waiting and sum(counted(t) for t in trials) >= self.budget:
                return None
            if self.sweep.method == "grid" and not waiting:  # the next point no trial holds
                taken = {point_key(t.params, self.sweep.space) for t in trials if counted(t)}
                point = next(
                    (
                        p
                        for p in grid_points(self.sweep)
                        if point_key(p, self.sweep.space) not in taken
                    ),
                    None,
                )
                if point is None:
                    return None
                self.study.enqueue_trial(point)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize"
                trial = self.study.ask()
            trial.set_user_attr(HOST, self.host)
            trial.set_user_attr(PID, self.pid)
            trials = self.study.get_trials(deepcopy=False)
            before = sum(counted(t) for t in trials if t.number < trial.number)
            if before >= self.budget:  # another machine asked at the same moment
                trial.set_user_attr(SURPLUS, True)
                self.study.tell(trial, state=_state("FAIL"))
                return None
            params = {k: suggest(trial, k, d) for k, d in self.sweep.space.items()}
            origin = self._origin(trial, trials)
            run = (
                origin.user_attrs.get(RUN, f"trial_{origin.number}")
                if origin is not None
                else f"trial_{trial.number}"
            )
            if origin is not None:
                trial.set_user_attr(RETRY_OF, origin.number)
            trial.set_user_attr(RUN, run)
        return {
            "trial": trial,
            "number": trial.number,
            "params": params,
            "run": run,
            "resumes": origin.number if origin is not None else None,
        }

    @staticmethod
    def _origin(trial, trials):
        """The interrupted trial this one retries (named when the retry was queued), or None."""
        retry_of = trial.user_attrs.get(RETRY_OF)
        if retry_of is None:
            return None
        return next((t for t in trials if t.number == retry_of), None)

    def _recover(self) -> None:
        """Fail the trials whose process is gone, and queue a retry of each interrupted one."""
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        storage = self.study._storage
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(self.study)  # no heartbeat for grace_s: any host
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get(PID)
            if (
                t.user_attrs.get(HOST) == self.host
                and pid not in (None, self.pid)
                and not _alive(pid)
            ):
                with contextlib.suppress(UpdateFinishedTrialError):
                    storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        trials = self.study.get_trials(deepcopy=False)
        claimed = {t.user_attrs.get(RETRY_OF) for t in trials}
        attempts: dict[str, int] = {}
        for t in trials:
            attempts[t.user_attrs.get(RUN)] = attempts.get(t.user_attrs.get(RUN), 0) + 1
        for t in trials:
            if (
                interrupted(t)
                and t.number not in claimed
                and attempts.get(t.user_attrs.get(RUN), 0) <= self.sweep.max_retries
            ):
                self.study.enqueue_trial(
                    t.params,
                    user_attrs={
                        RETRY_OF: t.number,
                        RUN: t.user_attrs.get(RUN, f"trial_{t.number}"),
                    },
                )

    # ------------------------------------------------------------ one trial

    def _run_trial(self, job: dict) -> None:
        """Run one trial to its outcome and tell the study (raises what stops the sweep)."""
        from src.core.trainer import TrainingDiverged
        from src.run.experiment import build, prepare

        number, params, run = job["number"], job["params"], job["run"]
        trial = job.get("trial")
        overrides = [
            *self.overrides,
            *(as_override(k, v) for k, v in params.items()),
            f"name={run}",
            f"logging.root={self.sweep_dir}",
        ]
        if self.sweep.keep_last is not None:
            overrides.append(f"checkpoint.keep_last={self.sweep.keep_last}")
        from src.run.sweep_pruning import Report

        report = Report(self.sweep.metric, trial, self.world)
        heartbeat = _Heartbeat(self.study, trial) if trial is not None else None
        t0 = time.time()
        outcome, value, error, exp, strategy, in_step = "FAIL", None, None, None, None, False
        try:
            cfg, origins = _quietly(lambda: prepare(str(self.experiment), overrides, self.imports))
            if self.world > 1 or not self.is_main:  # every rank says what it trains with
                from src.core.config import flatten

                flat = flatten(cfg.model_dump(mode="json"))
                used = " ".join(f"{k}={json.dumps(flat.get(k))}" for k in params)
                print(f"rank {self.rank} trial {number}: {used}", flush=True)
            report.samples_per_step = cfg.data.batch_size * cfg.trainer.grad_accum_steps
            self.rows.started(number, run, params, job.get("resumes"))
            with self._trial_output(run):
                exp = _quietly(lambda: build(cfg, origins))
                strategy = exp.strategy
                exp.callbacks.append(report)
                metrics = exp.run()
            in_step = True
            if report.pruned:
                outcome = "PRUNED"
            elif self.sweep.metric not in metrics:
                logged = ", ".join(sorted(metrics)) or "none"
                raise ConfigError(
                    f"metric: {self.sweep.metric!r} is not among the metrics of "
                    f"{self.sweep_dir / run} ({logged})"
                )
            else:
                value = float(metrics[self.sweep.metric])
                if math.isfinite(value):
                    outcome = "COMPLETE"
                else:
                    error = f"{self.sweep.metric} is {value}"
        except TrainingDiverged as exc:
            in_step, error = True, str(exc)
        except UserError as exc:  # a config this trial's parameters made (data, model, metric)
            error = exc.lines[0] if exc.lines else "refused"
            if isinstance(exc, ConfigError) and exc.lines and exc.lines[0].startswith("metric:"):
                self._tell(trial, "FAIL", None, error, 0, t0, heartbeat)
                raise
        except (SystemExit, KeyboardInterrupt):  # stopped by a signal: saved, retried later
            self._tell(trial, "INTERRUPTED", None, None, report.step, t0, heartbeat)
            raise
        except BaseException:
            self._tell(
                trial, "FAIL", None, "crashed (see the traceback)", report.step, t0, heartbeat
            )
            raise
        finally:
            from src.core.console import detach_log

            detach_log()  # the next trial's library output goes to its own log.txt
            if exp is not None:
                steps = exp.trainer.step if exp.trainer is not None else 0
                report.step = max(report.step, steps)
                del exp
            if strategy is not None:
                strategy.teardown(in_step, keep_group=self.world > 1)
        self._tell(trial, outcome, value, error, report.step, t0, heartbeat)

    @contextlib.contextmanager
    def _trial_output(self, run: str):
        """A trial's own console output goes to ``trial_<k>/console.txt`` (or the console with
        ``--verbose``; under a launcher, rank 0's)."""
        if self.verbose or not self.is_main:
            yield
            return
        folder = self.sweep_dir / run
        folder.mkdir(parents=True, exist_ok=True)
        with (
            open(folder / "console.txt", "a", encoding="utf-8") as f,
            contextlib.redirect_stdout(f),
        ):
            yield

    def _tell(
        self,
        trial,
        outcome: str,
        value: Optional[float],
        error: Optional[str],
        steps: int,
        t0: float,
        heartbeat,
    ) -> None:
        if heartbeat is not None:
            heartbeat.stop()
        if trial is None:  # not rank 0
            return
        import torch

        trial.set_user_attr(STEPS, steps)
        trial.set_user_attr(THREADS, torch.get_num_threads())
        trial.set_user_attr("seconds", round(time.time() - t0, 2))
        if error is not None:
            trial.set_user_attr(ERROR, error)
        if outcome == "INTERRUPTED":
            trial.set_user_attr(INTERRUPTED, True)
        state = {"COMPLETE": "COMPLETE", "PRUNED": "PRUNED"}.get(outcome, "FAIL")
        self.study.tell(trial, value if state == "COMPLETE" else None, state=_state(state))
        self.rows.finished(self.study, trial.number)


def _state(name: str):
    from optuna.trial import TrialState

    return TrialState[name]


class _Heartbeat:
    """Writes the trial's heartbeat every ``heartbeat_s`` while it runs (what lets another host
    tell a killed trial from a running one)."""

    def __init__(self, study, trial):
        self.storage, self.trial_id = study._storage, trial._trial_id
        self.stop_event = threading.Event()
        self.storage.record_heartbeat(self.trial_id)
        self.thread = threading.Thread(target=self._beat, daemon=True, name="sweep-heartbeat")
        self.thread.start()

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        while not self.stop_event.wait(interval):
            with contextlib.suppress(Exception):  # a busy database: the next beat will do
                self.storage.record_heartbeat(self.trial_id)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join()


# ---------------------------------------------------------------- workers


def _spawn(argv: list[str], workers: int, study, sweep: SweepConfig, sweep_dir: Path) -> int:
    """Run ``workers`` processes of this sweep and show the table while they work."""
    import subprocess

    from src.run.sweep_report import Rows, print_table, write_outputs

    args = [a for a in argv]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "src.main",
                "sweep",
                *args,
                "--worker",
                str(i),
                "--workers",
                str(workers),
            ]
        )
        for i in range(workers)
    ]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    rows = Rows(sweep, sweep_dir, live=True)
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
            rows.poll(study)
        rows.poll(study)
    finally:
        rows.close()
        for s, h in old.items():
            signal.signal(s, h)
    codes = [p.returncode for p in procs]
    write_outputs(study, sweep, sweep_dir)
    print_table(study, sweep, sweep_dir)
    bad = [c for c in codes if c]
    return bad[0] if bad else 0
