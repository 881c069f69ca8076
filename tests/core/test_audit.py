"""The sample audit: what every step read, kept true to the checkpoints across resumes."""

from __future__ import annotations

import json

import pytest
from helpers import LM_DATA, run, stop_and_resume

from src.core.audit import SampleAudit, epoch_ids, read_audit


def test_a_resume_drops_the_rolled_back_steps_and_a_torn_line(tmp_path):
    folder = tmp_path / "audit"
    folder.mkdir()
    rows = [{"step": s, "epoch": 0, "world": 2, "ids": [s * 10]} for s in (1, 2, 3)]
    for r in (0, 1):
        lines = [json.dumps({**x, "ids": [x["ids"][0] + r]}) for x in rows]
        (folder / f"rank{r}.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "ep')
    audit = SampleAudit(folder, rank=0, world_size=1)
    audit.start(2, barrier=lambda: None)  # resumed from step 2, now on one rank
    audit.add([7, 8])
    audit.commit(3, 0)
    audit.close()
    steps = read_audit(folder)
    assert {s: sorted(r["ids"]) for s, r in steps.items()} == {1: [10, 11], 2: [20, 21], 3: [7, 8]}
    assert epoch_ids(folder) == {0: [10, 11, 20, 21, 7, 8]}


@pytest.mark.parametrize(
    "section,stop",
    [
        ({"trainer.max_steps": 50}, 23),  # digits: rows
        ({**LM_DATA, "data.batch_size": 32, "trainer.max_steps": 20}, 11),  # a token store: blocks
    ],
    ids=["digits", "token_store"],
)
def test_every_training_sample_of_an_epoch_is_read_once_across_a_resume(
    write_config, tmp_path, section, stop
):
    """Stopped mid-epoch and resumed: the resumed run's audit is the uninterrupted run's, and
    each epoch reads every sample at most once (the first, whole epoch: every sample it has)."""
    section = {**section, "data.audit": True}
    straight, resumed, _, _ = stop_and_resume(write_config, tmp_path / "runs", section, stop)
    a, b = (read_audit(tmp_path / "runs" / name / "audit") for name in ("a", "b"))
    assert a == b and sorted(a) == list(range(1, section["trainer.max_steps"] + 1))
    n = len(straight.data.train)
    per_epoch = straight.derived["batches_per_epoch"]
    batch = straight.cfg.data.batch_size
    epochs = epoch_ids(tmp_path / "runs/a/audit")
    assert len(epochs) >= 2  # the run crosses an epoch's end
    for epoch, ids in epochs.items():
        assert len(set(ids)) == len(ids) and set(ids) <= set(range(n)), epoch
    assert len(epochs[0]) == per_epoch * batch


def test_no_audit_unless_asked(write_config, tmp_path):
    run(write_config({"trainer.max_steps": 2}))
    assert (tmp_path / "runs/tiny/metrics.jsonl").exists()
    assert not (tmp_path / "runs/tiny/audit").exists()


def test_turning_the_audit_on_extends_a_run(write_config, tmp_path):
    cfg = write_config({"trainer.max_steps": 4})
    run(cfg)
    run(cfg, "trainer.max_steps=8", "data.audit=true")
    assert sorted(read_audit(tmp_path / "runs/tiny/audit")) == [5, 6, 7, 8]  # resumed at 4
