"""Loggers: where metrics go. Only the main process builds them.

Each receives ``start(run_info, resume_step)`` once, ``log(metrics, step)`` with metric names
``split/name`` (``train/loss``, ``val/accuracy``) plus ``epoch``, and ``finish(status)``.
``run_info`` is the run's provenance: the resolved config flattened, where each value came from
(user, default, data, derived, environment), and the derived and environment facts.
"""

from __future__ import annotations

import abc
import json
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

from pydantic import Field

from src.core.registry import LOGGERS

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from wandb.sdk.wandb_run import Run as WandbRun


class Logger(abc.ABC):
    """Base of every LOGGERS entry. ``sink`` is what ``start`` opens (a file, a writer) and
    ``finish`` closes."""

    sink: Any = None

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def start(self, run_info: dict[str, Any], resume_step: int = 0) -> None:  # noqa: B027
        """Open the sink, once, before the first ``log``; ``run_info`` is the run record
        (``run_info.json``), ``resume_step`` the step a resumed run goes on from."""

    @abc.abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` (``{"train/loss": 0.41, ...}``, plain floats) at ``step``."""

    def log_text(self, texts: dict[str, str], step: int) -> None:  # noqa: B027
        """Named texts (generated samples ...) at ``step``; loggers without text ignore them."""

    def log_images(self, images: dict[str, Path], step: int) -> None:  # noqa: B027
        """PNG files of the finished run (``curves``, ``confusion_matrix``) by name."""

    def finish(self, status: str = "FINISHED") -> None:
        """Close the sink at the end of the run; ``status`` is ``FINISHED``, ``KILLED`` (stopped
        by a signal) or ``FAILED``."""
        if self.sink is not None:
            self.sink.close()
            self.sink = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


@LOGGERS.register("console")
class ConsoleLogger(Logger):
    """One line per log call: ``step 100/280 | epoch 3 | train/loss 0.1234 | ...``."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: Annotated[
            Optional[int],
            Field(description="steps shown after each step number (default: the run's)"),
        ] = None,
    ):
        super().__init__(run_dir)
        self.total = total_steps
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)

    def start(self, run_info: dict[str, Any], resume_step: int = 0) -> None:
        self.total = self.total or run_info.get("derived", {}).get("total_steps")

    def log(self, metrics: dict[str, float], step: int) -> None:
        parts = [f"step {step}" + (f"/{self.total}" if self.total else "")]
        parts += [f"{k} {_fmt(v)}" for k, v in metrics.items()]
        self.console.print(" | ".join(parts))

    def log_text(self, texts: dict[str, str], step: int) -> None:
        for name, text in texts.items():
            self.console.print(f"step {step} | {name}: {text!r}", markup=False)


@LOGGERS.register("jsonl")
class JSONLLogger(Logger):
    """``metrics.jsonl``: one object per line with ``step``, ``epoch``, ``time`` and the metrics.

    On resume, lines logged after the resumed step (by the interrupted run) are dropped first, so
    the file reads as one uninterrupted run.
    """

    def __init__(
        self,
        run_dir: Path,
        filename: Annotated[
            str, Field(description="file name inside the run folder")
        ] = "metrics.jsonl",
    ):
        super().__init__(run_dir)
        self.path = self.run_dir / filename
        self.t0 = time.time()

    def start(self, run_info: dict[str, Any], resume_step: int = 0) -> None:
        if self.path.exists():
            if resume_step:
                keep = [
                    line
                    for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step
                ]
                if keep:
                    self.t0 -= json.loads(keep[-1]).get("time", 0.0)
                self.path.write_text("".join(line + "\n" for line in keep))
            else:
                self.path.unlink()
        self.sink = open(self.path, "a", buffering=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, "epoch": metrics.get("epoch"), "time": round(time.time() - self.t0, 3)}
        row.update({k: v for k, v in metrics.items() if k != "epoch"})
        self.sink.write(json.dumps(row) + "\n")

    def log_text(self, texts: dict[str, str], step: int) -> None:
        self.sink.write(
            json.dumps(
                {
                    "step": step,
                    "time": round(time.time() - self.t0, 3),
                    **{f"text/{k}": v for k, v in texts.items()},
                }
            )
            + "\n"
        )


@LOGGERS.register("tensorboard")
class TensorBoardLogger(Logger):
    """Event files under ``<run>/tensorboard/``; the run info as text under ``config``."""

    def __init__(
        self,
        run_dir: Path,
        subdir: Annotated[
            str, Field(description="folder inside the run folder for the event files")
        ] = "tensorboard",
    ):
        super().__init__(run_dir)
        self.dir = self.run_dir / subdir

    def start(self, run_info: dict[str, Any], resume_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.sink = SummaryWriter(
            str(self.dir), purge_step=resume_step + 1 if resume_step else None
        )
        rows = "\n".join(
            f"| {k} | {v} | {run_info['origin'].get(k, '')} |"
            for k, v in run_info["params"].items()
        )
        self.sink.add_text("config", "| key | value | origin |\n|---|---|---|\n" + rows, 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.sink.add_scalar(k, v, step)

    def log_text(self, texts: dict[str, str], step: int) -> None:
        for k, v in texts.items():
            self.sink.add_text(f"text/{k}", v, step)


@LOGGERS.register("mlflow")
class MLflowLogger(Logger):
    """An MLflow run: params = the run info flattened, metrics, ``config.yaml`` as an artifact."""

    def __init__(
        self,
        run_dir: Path,
        tracking_uri: Annotated[
            Optional[str],
            Field(
                description="an MLflow tracking URI; default a local SQLite store in "
                "<run>/mlruns/mlflow.db with artifacts in <run>/mlruns/artifacts"
            ),
        ] = None,
        experiment: Annotated[
            Optional[str], Field(description="MLflow experiment name (default: the run's name)")
        ] = None,
    ):
        super().__init__(run_dir)
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self.store: Optional[Path] = None
        if tracking_uri:
            self.uri = tracking_uri
        else:
            self.store = (self.run_dir / "mlruns").resolve()
            self.uri = f"sqlite:///{self.store / 'mlflow.db'}"
        # a store of its own holds one run: its experiment is the run; a shared store groups
        # every run under one experiment, to be compared side by side
        self.experiment = experiment or (self.run_dir.name if self.store else "tessera")
        self.client: Optional[MlflowClient] = None
        self.run_id: Optional[str] = None

    def _active(self) -> tuple[MlflowClient, str]:
        if self.client is None or self.run_id is None:
            raise RuntimeError("MLflowLogger: logged to before start() or after finish()")
        return self.client, self.run_id

    def start(self, run_info: dict[str, Any], resume_step: int = 0) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        if self.store is not None:
            self.store.mkdir(parents=True, exist_ok=True)
        self.client = client = MlflowClient(tracking_uri=self.uri)
        id_file = self.run_dir / "mlflow_run_id"
        if resume_step and id_file.exists():
            self.run_id = id_file.read_text().strip()
            client.update_run(self.run_id, status="RUNNING")
            return
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(self.experiment, artifact_location=self._artifacts())
        )
        run = client.create_run(exp_id, run_name=self.run_dir.name)
        self.run_id = run_id = run.info.run_id
        id_file.write_text(run_id)
        params = [Param(k, str(v)[:6000]) for k, v in run_info["params"].items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[i : i + 100])
        tags = [RunTag(f"origin.{k}", v) for k, v in run_info["origin"].items()]
        for i in range(0, len(tags), 100):
            client.log_batch(run_id, tags=tags[i : i + 100])
        config = self.run_dir / "config.yaml"
        if config.exists():
            client.log_artifact(run_id, str(config))

    def _artifacts(self) -> Optional[str]:
        """Beside the database: <run>/mlruns/artifacts, or <shared db folder>/artifacts/<exp>
        for a shared SQLite file (the server's own default for other stores)."""
        if self.store is not None:
            return (self.store / "artifacts").as_uri()
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///") :])
            return (db.resolve().parent / "artifacts" / self.experiment).as_uri()
        return None

    def log_images(self, images: dict[str, Path], step: int) -> None:
        client, run_id = self._active()
        for path in images.values():
            client.log_artifact(run_id, str(path))

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        client, run_id = self._active()
        now = int(time.time() * 1000)
        client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def finish(self, status: str = "FINISHED") -> None:
        if self.client and self.run_id:
            self.client.set_terminated(self.run_id, status=status)
            self.client = None


@LOGGERS.register("wandb")
class WandbLogger(Logger):
    """Weights & Biases: config, metrics, text and the run's figures. Offline by default (the run
    is written under ``<run>/wandb/``; ``wandb sync <run>/wandb/offline-run-*`` uploads it
    later); ``mode: online`` logs live. A resumed run continues the same W&B run."""

    def __init__(
        self,
        run_dir: Path,
        project: Annotated[str, Field(description="W&B project")] = "tessera",
        mode: Annotated[
            Literal["offline", "online", "disabled"],
            Field(description="offline: files only, synced later; online: needs a login"),
        ] = "offline",
        entity: Annotated[Optional[str], Field(description="W&B team or user")] = None,
        group: Annotated[Optional[str], Field(description="groups runs (a sweep, ...)")] = None,
        tags: Annotated[list[str], Field(description="tags of the run")] = [],
    ):
        super().__init__(run_dir)
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            from src.core.errors import ConfigError

            raise ConfigError(
                "logging.loggers: wandb is not installed; pip install wandb (or "
                "the project's extra: pip install -e '.[wandb]')"
            )
        self.project, self.mode, self.entity, self.group, self.tags = (
            project,
            mode,
            entity,
            group,
            list(tags),
        )
        self.run: Optional[WandbRun] = None

    def _active(self) -> WandbRun:
        if self.run is None:
            raise RuntimeError("WandbLogger: logged to before start() or after finish()")
        return self.run

    def start(self, run_info: dict[str, Any], resume_step: int = 0) -> None:
        import wandb

        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume_step and id_file.exists() else None
        run_id = run_id or uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            tags=self.tags,
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=self.mode,
            config=run_info.get("params", {}),
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._active().log(dict(metrics), step=step)

    def log_text(self, texts: dict[str, str], step: int) -> None:
        import wandb

        self._active().log(
            {k: wandb.Html(f"<pre>{_escape(v)}</pre>") for k, v in texts.items()}, step=step
        )

    def log_images(self, images: dict[str, Path], step: int) -> None:
        import wandb

        self._active().log(
            {f"figures/{k}": wandb.Image(str(p)) for k, p in images.items()}, step=step
        )

    def finish(self, status: str = "FINISHED") -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
            self.run = None


def _escape(text: str) -> str:
    import html

    return html.escape(text)
