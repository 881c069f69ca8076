"""The sample audit (``data.audit: true``): which training samples every optimizer step read.

Each rank appends one line per optimizer step to ``<run>/audit/rank<r>.jsonl``::

    {"step": 13, "epoch": 0, "world": 2, "ids": [812, 77, ...]}

``ids`` are indices into the training set (a token store's block ids, a digit's row): this rank's
share of the step's global batch, over all its micro-batches. When a run resumes from step ``s``,
rank 0 first drops every line past ``s`` from every rank's file (steps a killed run took after its
last checkpoint were rolled back, and will be taken again), and a line torn by a kill. So the
files always describe the run as its checkpoints have it: :func:`read_audit` gives, per step, the
ids of every rank that took it, whatever the world size was at each step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, TextIO


class SampleAudit:
    """Writes this rank's audit file; :meth:`start` after the run's state has loaded."""

    def __init__(self, folder: Path, rank: int, world_size: int):
        self.folder, self.rank, self.world = Path(folder), rank, world_size
        self.ids: list[int] = []
        self.file: Optional[TextIO] = None

    def start(self, step: int, barrier) -> None:
        """Keep what steps ``1..step`` read, on every rank's file (rank 0 does it), then append."""
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.folder.glob("rank*.jsonl")):
                kept = []
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        if json.loads(line)["step"] <= step:
                            kept.append(line + "\n")
                    except (ValueError, KeyError, TypeError):  # a line torn by a kill
                        continue
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(kept), encoding="utf-8")
                tmp.replace(path)
        barrier()
        self.file = open(self.folder / f"rank{self.rank}.jsonl", "a", encoding="utf-8")

    def add(self, ids) -> None:
        """A loader batch this rank reads in the current step."""
        self.ids.extend(int(i) for i in ids)

    def commit(self, step: int, epoch: int) -> None:
        """The step is taken: its line is written (and flushed: a kill keeps it)."""
        assert self.file is not None, "SampleAudit.start() first"
        line = {"step": step, "epoch": epoch, "world": self.world, "ids": self.ids}
        self.file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.file.flush()
        self.ids = []

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_audit(folder: Path) -> dict[int, dict]:
    """``{step: {"epoch": e, "ranks": n, "ids": [every rank's ids]}}`` from every rank's file."""
    steps: dict[int, dict] = {}
    for path in sorted(Path(folder).glob("rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            step = steps.setdefault(rec["step"], {"epoch": rec["epoch"], "ranks": 0, "ids": []})
            step["ranks"] += 1
            step["ids"].extend(rec["ids"])
    return dict(sorted(steps.items()))


def epoch_ids(folder: Path, epoch: Optional[int] = None) -> dict[int, list[int]]:
    """``{epoch: every id its steps read}`` (or only ``epoch``'s)."""
    out: dict[int, list[int]] = {}
    for rec in read_audit(folder).values():
        if epoch is None or rec["epoch"] == epoch:
            out.setdefault(rec["epoch"], []).extend(rec["ids"])
    return out
