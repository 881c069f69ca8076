"""What a sweep shows and leaves: the table of trials (live while it runs), ``trials.csv``,
``best.yaml`` (a complete experiment config that reproduces the best trial) and plots.

    <root>/<sweep>/
        study.db         the Optuna study (SQLite, unless storage: names another database)
        trial_<k>/       one ordinary run folder per trial
        trials.csv       number, state, run, metric, steps, seconds, retry_of, params..., error
        best.yaml        python -m src.main --config <root>/<sweep>/best.yaml trains the best trial
        plot_history.png, plot_importances.png, plot_parallel.png, plot_intermediate.png
"""

from __future__ import annotations

import csv
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from src.run.sweep_config import SweepConfig, budget
from src.run.sweep_trials import ERROR, RETRY_OF, RUN, STEPS, SURPLUS, THREADS, decoded, interrupted

BEST = "best.yaml"
TRIALS = "trials.csv"
PLOTS = {
    "history": "plot_optimization_history",
    "importances": "plot_param_importances",
    "parallel": "plot_parallel_coordinate",
    "intermediate": "plot_intermediate_values",
}


def state_of(t) -> str:
    """complete | pruned | running | waiting | failed | interrupted."""
    name = t.state.name.lower()
    if name == "fail":
        return "failed" if ERROR in t.user_attrs else "interrupted"
    return name


def trial_rows(study) -> list:
    """The sweep's trials, one each: no surplus ask, no interrupted trial a retry took over."""
    trials = study.get_trials(deepcopy=False)
    claimed = {t.user_attrs.get(RETRY_OF) for t in trials}
    return [
        t
        for t in trials
        if SURPLUS not in t.user_attrs and not (interrupted(t) and t.number in claimed)
    ]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if not isinstance(v, str) else v


def _best(study, rows: list):
    complete = [t for t in rows if t.state.name == "COMPLETE" and t.value is not None]
    if not complete:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(
        complete, key=lambda t: (t.value, -t.number) if pick is max else (t.value, t.number)
    )


def _seconds(t) -> Optional[float]:
    if t.datetime_start is None:
        return None
    if t.datetime_complete is not None:
        return round((t.datetime_complete - t.datetime_start).total_seconds(), 2)
    return t.user_attrs.get("seconds")


def write_trials_csv(study, sweep: SweepConfig, sweep_dir: Path) -> Path:
    from src.run.inference import atomic_path

    keys = list(sweep.space)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["number", "state", "run", sweep.metric, "steps", "seconds", "retry_of", *keys, "error"]
    )
    for t in trial_rows(study):
        params = decoded(t.params, sweep.space)
        w.writerow(
            [
                t.number,
                state_of(t),
                t.user_attrs.get(RUN, ""),
                "" if t.value is None else repr(t.value),
                t.user_attrs.get(STEPS, ""),
                _seconds(t) or "",
                t.user_attrs.get(RETRY_OF, ""),
                *[
                    json.dumps(params[k])
                    if k in params and not isinstance(params[k], str)
                    else params.get(k, "")
                    for k in keys
                ],
                t.user_attrs.get(ERROR, ""),
            ]
        )
    path = sweep_dir / TRIALS
    with atomic_path(path) as tmp:
        Path(tmp).write_text(buf.getvalue(), encoding="utf-8")
    return path


def write_best(study, sweep: SweepConfig, sweep_dir: Path) -> Optional[Path]:
    """``best.yaml``: the best trial's own resolved config, named ``<sweep>-best`` and rooted
    where the sweep's experiment writes its runs."""
    import yaml

    from src.run.inference import atomic_path

    best = _best(study, trial_rows(study))
    if best is None:
        return None
    run = sweep_dir / best.user_attrs.get(RUN, f"trial_{best.number}")
    source = run / "config.yaml"
    if not source.is_file():
        return None
    cfg = yaml.safe_load(source.read_text(encoding="utf-8"))
    cfg["name"] = f"{sweep.name}-best"
    cfg.setdefault("logging", {})["root"] = str(sweep_dir.parent)
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in decoded(best.params, sweep.space).items())
    header = (
        f"# The best trial of sweep {sweep.name}: trial {best.number} ({run}),\n"
        f"# {sweep.metric} {best.value:.6g} with {params}.\n"
        f"# Train it again: {reproduce_command(best, sweep_dir)}\n"
        "# (On a CPU the metrics depend on the thread count: this uses the trial's.)\n"
    )
    path = sweep_dir / BEST
    with atomic_path(path) as tmp:
        Path(tmp).write_text(header + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def reproduce_command(best, sweep_dir: Path) -> str:
    """The command that trains the best trial again: with the trial's thread count where it
    differs from a plain run's (CPU sums depend on it, so the metrics do too)."""
    import torch

    threads = best.user_attrs.get(THREADS)
    prefix = f"OMP_NUM_THREADS={threads} " if threads and threads != torch.get_num_threads() else ""
    return f"{prefix}python -m src.main --config {sweep_dir / BEST}"


def write_plots(study, sweep_dir: Path) -> list[str]:
    """Optuna's matplotlib plots of the study; returns a line per plot that could not be drawn
    (too few trials, one parameter, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    from src.run.inference import atomic_path

    skipped = []
    for name, fn in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental"
                ax = getattr(ovm, fn)(study)
            first = ax.flat[0] if hasattr(ax, "flat") else ax
            if name == "intermediate":  # values are reported at the samples trained on
                first.set_xlabel("training samples seen")
            fig = first.figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), 5)
            fig.tight_layout()
            with atomic_path(sweep_dir / f"plot_{name}.png") as tmp:
                fig.savefig(tmp, format="png", dpi=100)
        except Exception as exc:  # an empty or one-trial study has nothing to draw
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            skipped.append(f"plot_{name}.png: not drawn ({first[:120]})")
        finally:
            plt.close("all")
    return skipped


def write_outputs(study, sweep: SweepConfig, sweep_dir: Path) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_trials_csv(study, sweep, sweep_dir)
    write_best(study, sweep, sweep_dir)
    for line in write_plots(study, sweep_dir):
        print(f"note: {line}", flush=True)


def table(study, sweep: SweepConfig):
    from rich.table import Table

    rows = trial_rows(study)
    best = _best(study, rows)
    done = sum(t.state.name in ("COMPLETE", "PRUNED") or ERROR in t.user_attrs for t in rows)
    t = Table(
        title=f"sweep {sweep.name}: {done} of {budget(sweep)} trials, "
        f"{sweep.direction} {sweep.metric}",
        title_justify="left",
    )
    for col in ("trial", "state", sweep.metric, "steps", "seconds", *sweep.space):
        t.add_column(col, justify="right" if col != "state" else "left")
    for tr in rows:
        params = decoded(tr.params, sweep.space)
        mark = " *" if best is not None and tr.number == best.number else ""
        t.add_row(
            f"{tr.number}{mark}",
            state_of(tr),
            "" if tr.value is None else f"{tr.value:.4f}",
            str(tr.user_attrs.get(STEPS, "")),
            str(_seconds(tr) or ""),
            *[_fmt(params[k]) if k in params else "" for k in sweep.space],
        )
    return t


def print_table(study, sweep: SweepConfig, sweep_dir: Path) -> None:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=False, width=max(100, _width()))
    console.print(table(study, sweep))
    rows = trial_rows(study)
    best = _best(study, rows)
    if best is not None:
        params = " ".join(f"{k}={_fmt(v)}" for k, v in decoded(best.params, sweep.space).items())
        console.print(f"best     trial {best.number}: {sweep.metric} {best.value:.4f} | {params}")
        if (sweep_dir / BEST).is_file():
            console.print(f"reproduce {reproduce_command(best, sweep_dir)}")
    console.print(f"files    {sweep_dir}/ ({TRIALS}, {BEST}, plot_*.png, trial_<k>/)")


def _width() -> int:
    import shutil

    return shutil.get_terminal_size((120, 24)).columns


class Rows:
    """The table while the sweep runs: redrawn in place on a terminal, else one line per trial
    as it starts and ends (what a log file can hold)."""

    def __init__(self, sweep: SweepConfig, sweep_dir: Path, live: bool, study=None):
        self.sweep, self.sweep_dir, self.study = sweep, sweep_dir, study
        self.enabled = live
        self.live = None
        self.seen: set[int] = set()
        if live and sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(auto_refresh=False, transient=False)
            self.live.start()

    def started(self, number: int, run: str, params: dict, resumes: Optional[int]) -> None:
        if not self.enabled or self.live is not None:
            return
        again = f" (retries trial {resumes}, resumes {run})" if resumes is not None else ""
        values = " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        print(f"trial {number} started{again}: {values}", flush=True)

    def finished(self, study, number: int) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(table(study, self.sweep), refresh=True)
            return
        t = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if t is not None:
            self._line(study, t)

    def poll(self, study) -> None:
        """Show the trials that ended since the last call (workers run in other processes)."""
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(table(study, self.sweep), refresh=True)
            return
        for t in trial_rows(study):
            if t.number not in self.seen and t.state.name not in ("RUNNING", "WAITING"):
                self._line(study, t)

    def _line(self, study, t) -> None:
        self.seen.add(t.number)
        best = _best(study, trial_rows(study))
        value = (
            f"{self.sweep.metric} {t.value:.4f}"
            if t.value is not None
            else t.user_attrs.get(ERROR, "")
        )
        lead = f" | best {best.value:.4f} (trial {best.number})" if best is not None else ""
        print(
            f"trial {t.number} {state_of(t)}: {value}, {t.user_attrs.get(STEPS, 0)} steps, "
            f"{_seconds(t) or 0:.1f} s{lead}",
            flush=True,
        )

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
