"""What a run says on the console: a start banner, an end summary, and nothing else of libraries.

Third-party notes (DeepSpeed's accelerator lines, transformers' and PEFT's FutureWarnings, MLflow's
table creation, bitsandbytes' kernel notes) go to the run's ``log.txt`` instead of the console;
the platform's own warnings stay on the console as one line each, without a source location.
:func:`quiet_libraries` installs this for the command line; :func:`attach_log` opens the file
once the run folder is known (what came before is written into it then).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

LIBRARY_LOGGERS = (
    "DeepSpeed",
    "deepspeed",
    "transformers",
    "peft",
    "mlflow",
    "alembic",
    "bitsandbytes",
    "timm",
    "accelerate",
    "torch.distributed",
    "urllib3",
    "huggingface_hub",
    "datasets",
    "faiss",
    "matplotlib",
    "PIL",
)
_OWN = str(Path(__file__).resolve().parents[1])  # the src/ folder


class _LogSink(logging.Handler):
    """Holds library records (and warnings) in memory until the run's log file is known."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.held: list[str] = []
        self.file = None
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record))

    def write(self, line: str) -> None:
        if self.file is not None:
            self.file.write(line.rstrip("\n") + "\n")
            self.file.flush()
        else:
            self.held.append(line)

    def open(self, path: Path) -> None:
        if self.file is not None:
            return
        self.file = open(path, "a", encoding="utf-8")
        for line in self.held:
            self.file.write(line.rstrip("\n") + "\n")
        self.held.clear()
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


_sink: Optional[_LogSink] = None


def _reroute(sink: _LogSink) -> None:
    """Library loggers write to the sink only (a library may add its own handler on import)."""
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers = [sink]
        lg.propagate = False


class _HeldStream(io.TextIOBase):
    """Stands in for stdout or stderr while a config is built (see :func:`held_output`);
    streams that libraries opened meanwhile write through once released."""

    def __init__(self, real):
        self.real, self.held, self.holding = real, [], True

    def write(self, text: str) -> int:
        if self.holding:
            self.held.append(text)
        else:
            self.real.write(text)
        return len(text)

    def flush(self) -> None:
        if not self.holding:
            self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()


class _Held:
    def __init__(self):
        self.out, self.err = _HeldStream(sys.stdout), _HeldStream(sys.stderr)
        sys.stdout, sys.stderr = self.out, self.err

    def release(self, outcome: str) -> None:
        """``drop`` (a config error: the error alone is shown), ``console`` or ``log``."""
        sys.stdout, sys.stderr = self.out.real, self.err.real
        for stream in (self.out, self.err):
            stream.holding = False
            text = "".join(stream.held)
            stream.held.clear()
            if not text or outcome == "drop":
                continue
            if outcome == "log" and _sink is not None:
                for line in text.splitlines():
                    if line.strip():
                        _sink.write(line)
            else:
                stream.real.write(text)
        if _sink is not None:
            _reroute(_sink)


def held_output() -> _Held:
    """Hold what is printed (stdout and stderr) from now until ``release(outcome)``."""
    return _Held()


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Route library logs and warnings to the run's log file; ours stay one line on stderr."""
    global _sink
    sink = _sink = _LogSink()
    saved = []
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, list(lg.handlers), lg.propagate, lg.level))
        lg.setLevel(logging.INFO)
    _reroute(sink)
    old_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(_OWN):  # ours: on the console even while output is held
            err = sys.stderr.real if isinstance(sys.stderr, _HeldStream) else sys.stderr
            print(f"warning: {message}", file=err, flush=True)
        else:
            sink.write(f"{category.__name__}: {message} ({filename}:{lineno})")

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = old_show
        for lg, handlers, propagate, level in saved:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        sink.close()
        _sink = None


def attach_log(run_dir: Path) -> None:
    """Write library output from now on (and what was held) to ``run_dir/log.txt``."""
    if _sink is not None:
        _sink.open(Path(run_dir) / "log.txt")
        _reroute(_sink)


def detach_log() -> None:
    """Stop writing to the current run's ``log.txt`` (the next :func:`attach_log` opens another;
    a sweep runs many runs in one process)."""
    if _sink is not None and _sink.file is not None:
        _sink.file.close()
        _sink.file = None


def banner(exp, decision, resumed: int) -> str:
    """The lines a run starts with: folder and whether it is new, model, data, compute."""
    s, cfg = exp.summary(), exp.cfg
    state = {
        "new": "new run",
        "resume": f"resumed at step {resumed}",
        "extend": f"resumed at step {resumed}, extended: {decision.describe()}",
    }
    info = exp.data.info
    return "\n".join(
        [
            f"run      {exp.run_dir} ({state.get(decision.kind, decision.kind)})",
            f"model    {cfg.model['type']}: {s['model_parameters']:,} parameters "
            f"({s['trainable_parameters']:,} trainable)",
            f"data     {cfg.data.type}: {s['train_samples']:,} train / {s['val_samples']:,} val "
            f"samples, input {tuple(info.input_shape)}, batch {cfg.data.batch_size} x "
            f"{cfg.trainer.grad_accum_steps}, {s['steps_per_epoch']} steps per epoch",
            *[_store_line(fact) for fact in info.extra.get("token_stores", ())],
            f"compute  {cfg.strategy['type']} on {exp.strategy.device}, world size "
            f"{exp.strategy.world_size}, {cfg.trainer.precision}, {s['total_steps']} steps",
        ]
    )


def _store_line(fact: dict) -> str:
    """``data     store <path>: 118 M tokens (cached)`` or ``(built in 2 min 41 s)``."""
    n = fact["tokens"]
    count = f"{n / 1e6:,.0f} M" if n >= 10**7 else f"{n / 1e6:.1f} M" if n >= 10**5 else f"{n:,}"
    built = fact.get("built_seconds")
    state = "cached" if built is None else f"built in {duration(built)}"
    return f"data     store {fact['path']}: {count} tokens ({state})"


def summary(exp, metrics: dict[str, float], seconds: float) -> str:
    """The lines a run ends with: final and best metrics, where things are, what to do next."""
    trainer, run_dir = exp.trainer, exp.run_dir
    final = {k: v for k, v in metrics.items() if k.startswith("val/")} or {
        k: v for k, v in metrics.items() if k in ("train/loss", "train/accuracy")
    }
    lines = [
        f"done     step {trainer.step} of {trainer.max_steps} in {duration(seconds)}"
        + (
            " | final " + " ".join(f"{k} {v:.4g}" for k, v in list(final.items())[:4])
            if final
            else ""
        )
    ]
    best = _best(run_dir)
    if best:
        lines.append("best     " + " | ".join(f"{k} {v:.4g} (step {s})" for k, (v, s) in best))
    ckpt = trainer.checkpoints.latest() if trainer.checkpoints is not None else None
    if ckpt is not None:
        lines.append(f"saved    {ckpt} (artifacts and metrics in {run_dir})")
        lines.append(
            f"next     predict: python -m src.main predict --run {run_dir}; export: "
            f"python -m src.main export --run {run_dir} {exported(exp)}; "
            "train on: the same command with a larger trainer.max_steps"
        )
    return "\n".join(lines)


def exported(exp) -> str:
    """The export the ``next`` line suggests: ONNX where the task has an inference model, else
    the weights (RLHF, vision-language: no single module to export), every task weight when
    some that trained are outside ``model:`` (a projector, heads)."""
    from src.core.errors import UserError

    try:
        exp.task.inference()
    except UserError:
        outside = any(
            p.requires_grad and not n.startswith("model.") for n, p in exp.task.named_parameters()
        )
        return ("--task " if outside else "") + f"--out {exp.cfg.name}.safetensors"
    return f"--out {exp.cfg.name}.onnx"


def _best(run_dir: Path) -> list[tuple[str, tuple[float, int]]]:
    """The best value of the main validation metrics in metrics.jsonl (loss: lowest)."""
    import json

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    best: dict[str, tuple[float, int]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        for k, v in row.items():
            if (
                k.startswith("val/")
                and isinstance(v, (int, float))
                and k
                in (
                    "val/loss",
                    "val/accuracy",
                    "val/knn_accuracy",
                    "val/probe_accuracy",
                    "val/perplexity",
                    "val/map_at_r",
                    "val/recall_at_1",
                )
            ):
                lower = "loss" in k or "perplexity" in k
                if k not in best or (v < best[k][0] if lower else v > best[k][0]):
                    best[k] = (v, row.get("step", 0))
    return sorted(best.items())


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"
