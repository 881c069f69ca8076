"""torch.profiler over a few training steps: Chrome and TensorBoard traces, a table of the top ops.

    callbacks: [{type: profiler, wait: 5, warmup: 2, active: 5}]

Writes ``<run>/profiler/trace_<step>.json`` (open in chrome://tracing or ui.perfetto.dev),
``<run>/profiler/tensorboard/`` (``tensorboard --logdir <run>/profiler/tensorboard``), and
``<run>/profiler/top_ops.txt``, the table printed at the end. On a GPU with
``memory_snapshot: true`` it records allocation history and, on CUDA out-of-memory, dumps
``<run>/profiler/oom_snapshot.pickle`` (drag it into pytorch.org/memory_viz). Without this callback
nothing of the profiler runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
from pydantic import Field

from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS


@CALLBACKS.register("profiler")
class Profiler(Callback):
    """torch.profiler with a wait/warmup/active schedule on the chosen ranks; traces and a top-ops
    table under ``<run>/profiler/``."""

    def __init__(
        self,
        wait: Annotated[int, Field(ge=0, description="steps skipped before warm-up")] = 1,
        warmup: Annotated[int, Field(ge=0, description="steps traced but discarded")] = 1,
        active: Annotated[int, Field(gt=0, description="steps recorded")] = 3,
        repeat: Annotated[int, Field(ge=1, description="cycles of wait/warmup/active")] = 1,
        ranks: Annotated[list[int], Field(description="ranks that profile")] = [0],
        record_shapes: Annotated[bool, Field(description="record input shapes")] = False,
        profile_memory: Annotated[bool, Field(description="track tensor memory")] = False,
        with_stack: Annotated[bool, Field(description="record Python stacks (slower)")] = False,
        sort_by: Annotated[
            str,
            Field(
                description=(
                    "column of the top-ops table (self_cpu_time_total, cuda_time_total, ...)"
                )
            ),
        ] = "",
        row_limit: Annotated[int, Field(gt=0, description="rows of the top-ops table")] = 15,
        memory_snapshot: Annotated[
            bool,
            Field(description=("CUDA only: record allocations; dump a snapshot on out-of-memory")),
        ] = False,
    ):
        self.schedule = dict(wait=wait, warmup=warmup, active=active, repeat=repeat)
        self.ranks, self.sort_by, self.row_limit = list(ranks), sort_by, row_limit
        self.record_shapes, self.profile_memory = record_shapes, profile_memory
        self.with_stack = with_stack
        self.memory_snapshot = memory_snapshot
        self.prof: Optional[torch.profiler.profile] = None
        self.out: Optional[Path] = None
        self.traces: list[Path] = []

    def on_fit_start(self, trainer) -> None:
        if trainer.strategy.rank not in self.ranks or trainer.run_dir is None:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        self.out = out = Path(trainer.run_dir) / "profiler"
        out.mkdir(parents=True, exist_ok=True)
        cuda = trainer.strategy.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        tensorboard = torch.profiler.tensorboard_trace_handler(
            str(out / "tensorboard"), worker_name=f"rank{trainer.strategy.rank}"
        )

        def ready(prof) -> None:  # kineto saves a trace once: the TensorBoard file is a
            import shutil  # Chrome trace too, copied under a plain name

            tensorboard(prof)
            written = max(
                (out / "tensorboard").glob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime
            )
            gz = ".gz" if written.name.endswith(".gz") else ""
            path = out / f"trace_{trainer.step}.json{gz}"
            shutil.copyfile(written, path)
            self.traces.append(path)

        if cuda and self.memory_snapshot:
            _snapshot_on_oom(out / "oom_snapshot.pickle")
        self.sort_by = self.sort_by or ("cuda_time_total" if cuda else "self_cpu_time_total")
        self.prof = profile(
            activities=activities,
            schedule=schedule(**self.schedule),
            on_trace_ready=ready,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
        )
        self.prof.start()

    def on_step_end(self, trainer, outputs) -> None:
        if self.prof is not None:
            self.prof.step()

    def on_fit_end(self, trainer) -> None:
        if self.prof is None:
            return
        self.prof.stop()
        try:
            table = self.prof.key_averages().table(sort_by=self.sort_by, row_limit=self.row_limit)
        except (AssertionError, KeyError, RuntimeError):  # nothing recorded (a very short run)
            table = ""
        self.prof = None
        if table and self.out is not None:
            (self.out / "top_ops.txt").write_text(table + "\n")
            where = ", ".join(str(p) for p in self.traces[-1:])
            print(
                f"profiler: top ops by {self.sort_by} (trace {where}; "
                f"tensorboard --logdir {self.out / 'tensorboard'})\n{table}",
                flush=True,
            )


def _snapshot_on_oom(path: Path) -> None:
    """Record CUDA allocation history and dump it when an allocation fails (PyTorch's recipe in
    'Understanding CUDA Memory Usage')."""
    import pickle

    torch.cuda.memory._record_memory_history(max_entries=100_000)

    def observer(device, alloc, device_alloc, device_free) -> None:
        with open(path, "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)

    # PyTorch's documented recipe; the private hook is absent from torch's stubs
    torch._C._cuda_attach_out_of_memory_observer(observer)  # type: ignore[attr-defined]
