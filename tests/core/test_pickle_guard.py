"""A checkpoint never runs code: a pickle that would create a file, put into each file of a
checkpoint of every strategy, is refused by resume and export before any library reads it."""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_config
from helpers import launch, run

BASE = {
    "trainer.max_steps": 4,
    "trainer.log_every": 2,
    "trainer.eval_every_n_epochs": None,
    "checkpoint.every_n_steps": 4,
    "data.batch_size": 64,
    "model": {"type": "mlp", "hidden": [32]},
}
STRATEGIES = {
    "single": ({}, None),
    "ddp": ({"strategy": {"type": "ddp"}}, "warm"),
    "fsdp": ({"strategy": {"type": "fsdp"}}, "warm"),
    "deepspeed": (
        {"strategy": {"type": "deepspeed", "config": {"zero_optimization": {"stage": 2}}}},
        "warm",
    ),
}


class Payload:
    """Unpickled without restriction, this creates ``path``: code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One committed step folder per strategy (written by 2 ranks where distributed)."""
    tmp = tmp_path_factory.mktemp("written")
    out = {}
    for name, (changes, launcher) in STRATEGIES.items():
        cfg = make_config(tmp, {**BASE, **changes, "name": name}, f"{name}.yaml")
        if launcher is None:
            run(cfg)
        else:
            launch(2, cfg, launcher=launcher)
        out[name] = tmp / "runs" / name / "checkpoints" / "step_00000004"
    return out


def poisoned_files(step: Path) -> list[str]:
    """Every file of the step folder a reader unpickles, and DCP's non-tensor entries."""
    names = [
        str(p.relative_to(step))
        for p in sorted(step.rglob("*"))
        if p.suffix in (".pt", ".metadata") or p.name == ".metadata"
    ]
    if (step / "dcp").is_dir():
        names.append("dcp/<bytes entry>")
    return names


def poison(step: Path, name: str, dest: Path, marker: Path) -> Path:
    """A copy of ``step`` with the payload in file ``name`` (a torch.save zip for .pt files, a
    plain pickle for DCP's metadata, an appended blob that metadata points to for DCP's entries)."""
    copy = dest / step.name
    shutil.copytree(step, copy)
    if name == "dcp/<bytes entry>":
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        meta_path = copy / "dcp" / ".metadata"
        meta = pickle.loads(meta_path.read_bytes())
        index = next(
            i
            for i in meta.storage_data
            if isinstance(meta.state_dict_metadata[i.fqn], BytesStorageMetadata)
        )
        info = meta.storage_data[index]
        blob = io.BytesIO()
        torch.save(Payload(marker), blob)
        shard = copy / "dcp" / info.relative_path
        offset = shard.stat().st_size
        with open(shard, "ab") as f:
            f.write(blob.getvalue())
        meta.storage_data[index] = _StorageInfo(info.relative_path, offset, len(blob.getvalue()))
        meta_path.write_bytes(pickle.dumps(meta))
    elif name.endswith(".metadata"):
        (copy / name).write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save(Payload(marker), copy / name)
    return copy


CASES = [
    (s, f)
    for s, files in {
        "single": ["optimizer.pt", "trainer.pt", "rank_00000.pt"],
        "ddp": ["optimizer.pt", "trainer.pt", "rank_00000.pt", "rank_00001.pt"],
        "fsdp": [
            "dcp/.metadata",
            "dcp/<bytes entry>",
            "trainer.pt",
            "rank_00000.pt",
            "rank_00001.pt",
        ],
        "deepspeed": [
            "deepspeed/mp_rank_00_model_states.pt",
            "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "trainer.pt",
            "rank_00000.pt",
            "rank_00001.pt",
        ],
    }.items()
    for f in files
]


def test_the_cases_cover_every_file_a_reader_unpickles(checkpoints):
    for strategy, step in checkpoints.items():
        assert set(poisoned_files(step)) == {f for s, f in CASES if s == strategy}, strategy


@pytest.mark.parametrize("strategy,name", CASES)
def test_export_refuses_a_pickle_that_runs_code(checkpoints, strategy, name, tmp_path, capsys):
    from src.main import main

    marker = tmp_path / "code_ran"
    step = poison(checkpoints[strategy], name, tmp_path, marker)
    out = tmp_path / "out.safetensors"
    assert main(["export", "--checkpoint", str(step), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refuses to load the pickled global" in err[0], err
    assert name.split("/<")[0].split("/")[-1] in err[0] and "open" in err[0]
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("strategy,name", CASES)
def test_predict_and_onnx_export_refuse_a_pickle_that_runs_code(
    checkpoints, strategy, name, tmp_path, capsys
):
    """The config builds the model; the poisoned step folder is read for its weights."""
    from src.main import main

    marker = tmp_path / "code_ran"
    step = poison(checkpoints[strategy], name, tmp_path, marker)
    config = str(checkpoints[strategy].parents[3] / f"{strategy}.yaml")
    for command in (
        ["predict", "--out", str(tmp_path / "p.jsonl")],
        ["export", "--out", str(tmp_path / "m.onnx")],
    ):
        assert main([*command, "--checkpoint", str(step), "--config", config]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refuses to load the pickled global" in err[0], err
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == [step.name]


def test_predict_reads_every_strategys_checkpoint(checkpoints, tmp_path):
    """Consolidated into one process's model: DCP shards and DeepSpeed's ZeRO-2 files alike."""
    import json

    from src.main import main

    for strategy, step in checkpoints.items():
        out = tmp_path / f"{strategy}.jsonl"
        assert main(["predict", "--run", str(step.parents[1]), "--out", str(out)]) == 0, strategy
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["id"] for r in rows] == list(range(359)), strategy


@pytest.mark.parametrize("strategy,name", [c for c in CASES if c[0] != "deepspeed"])
def test_resume_refuses_a_pickle_that_runs_code(checkpoints, strategy, name, tmp_path, capsys):
    """Single-process resume of every strategy's files but DeepSpeed's (below, on 2 ranks)."""
    from src.main import main

    marker = tmp_path / "code_ran"
    step = poison(checkpoints[strategy], name, tmp_path, marker)
    cfg = make_config(tmp_path, {**BASE, "trainer.max_steps": 6})
    assert main(["--config", str(cfg), f"checkpoint.resume={step}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refuses to load the pickled global" in err[0], err
    assert not marker.exists()


def test_resume_auto_stops_at_a_poisoned_checkpoint_of_its_own_run(tmp_path, capsys):
    """A tampered file in the run's own folder is not skipped like a damaged one: it stops."""
    from src.main import main

    cfg = make_config(tmp_path, BASE)
    run(cfg)
    marker = tmp_path / "code_ran"
    step = tmp_path / "runs/tiny/checkpoints/step_00000004"
    torch.save(Payload(marker), step / "optimizer.pt")
    assert main(["--config", str(cfg), "trainer.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.pt:" in err and "refuses" in err and not marker.exists()


@pytest.mark.distributed
def test_deepspeed_resume_on_two_ranks_refuses_a_poisoned_shard(checkpoints, tmp_path):
    marker = tmp_path / "code_ran"
    step = poison(
        checkpoints["deepspeed"],
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        tmp_path,
        marker,
    )
    cfg = make_config(
        tmp_path,
        {
            **BASE,
            **STRATEGIES["deepspeed"][0],
            "trainer.max_steps": 6,
            "checkpoint.resume": str(step),
        },
    )
    out = launch(2, cfg, expect=1)
    assert out.returncodes == [2, 2], out.stderr[-2000:]
    assert "refuses to load the pickled global" in out.stderr and not marker.exists()


def test_trust_pickles_is_the_documented_opt_out(checkpoints, tmp_path):
    """With --trust-pickles the libraries read the file as they would: the payload runs (which is
    why the check is on by default)."""
    from src.main import main

    marker = tmp_path / "code_ran"
    step = poison(checkpoints["fsdp"], "dcp/.metadata", tmp_path, marker)
    # the payload is not a real metadata record: once it ran, the read fails with one line
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(step),
                "--out",
                str(tmp_path / "o.safetensors"),
                "--trust-pickles",
            ]
        )
        == 2
    )
    assert marker.exists()


def test_every_checkpoint_format_passes_the_check(checkpoints):
    from src.core.pickle_guard import verify_checkpoint

    for step in checkpoints.values():
        verify_checkpoint(step)


@pytest.mark.parametrize(
    "data,expected",
    [
        (pickle.dumps(Payload("/nonexistent/x")), "refuses to load the pickled global"),
        (pickle.dumps(1) + b"\x80\x02more", "bytes after the first pickle"),
        (b"\x80\x04not a pickle", "unreadable checkpoint file"),
    ],
)
def test_a_single_file_is_checked_without_running_anything(tmp_path, data, expected):
    from src.core.errors import CheckpointError
    from src.core.pickle_guard import check_file

    f = tmp_path / "x.pt"
    f.write_bytes(data)
    with pytest.raises(CheckpointError, match=expected):
        check_file(f)
