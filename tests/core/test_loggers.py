import json

import yaml
from helpers import run


def test_tensorboard_and_mlflow_are_readable_by_their_own_tools(write_config, tmp_path):
    run(
        write_config(
            {
                "logging.loggers": ["console", "jsonl", "tensorboard", "mlflow"],
                "trainer.eval_every_n_steps": 10,
            }
        )
    )
    run_dir = tmp_path / "runs/tiny"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/accuracy"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15, 20]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlruns/mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.params["optimizer.lr"] == "0.001" and r.data.params["derived.total_steps"] == "20"
    assert r.data.tags["origin.optimizer.lr"] == "file"
    assert r.data.tags["origin.trainer.precision"] == "default"
    assert r.data.tags["origin.data.num_classes"] == "data"
    assert r.data.tags["origin.derived.steps_per_epoch"] == "derived"
    assert r.data.tags["origin.env.torch"] == "environment"
    history = client.get_metric_history(r.info.run_id, "train/loss")
    assert [m.step for m in history] == [5, 10, 15, 20]
    artifacts = [a.path for a in client.list_artifacts(r.info.run_id)]
    assert "config.yaml" in artifacts


def test_run_folder_holds_resolved_config_and_provenance(write_config, tmp_path):
    run(write_config(), "optimizer.lr=0.01")
    run_dir = tmp_path / "runs/tiny"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["optimizer"]["lr"] == 0.01 and resolved["trainer"]["grad_accum_steps"] == 1
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["origin"]["optimizer.lr"] == "cli"
    assert info["origin"]["model.type"] == "file" and info["origin"]["seed"] == "file"
    assert info["origin"]["trainer.precision"] == "default"
    assert info["params"]["derived.effective_batch_size"] == 32
    assert info["params"]["data.num_classes"] == 10


def read_wandb(path):
    """The records of a W&B offline ``.wandb`` file, decoded with W&B's own protobuf schema (the
    file is a LevelDB-style log: 7-byte header, 32 KiB blocks of checksummed chunks)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_wandb_offline_run_holds_config_metrics_and_figures(write_config, tmp_path):
    run(
        write_config(
            {
                "logging.loggers": ["jsonl", {"type": "wandb", "tags": ["t"]}],
                "trainer.eval_every_n_steps": 10,
            }
        )
    )
    run_dir = tmp_path / "runs/tiny"
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = read_wandb(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and "exit" in kinds
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run_record.config.update}
    assert config["optimizer.lr"] == 1e-3 and run_record.display_name == "tiny"
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {(r["step"], k): v for r in rows for k, v in r.items()}
    val = [(h["_step"], h["val/accuracy"]) for h in history if "val/accuracy" in h]
    assert val and all(logged[(s, "val/accuracy")] == v for s, v in val)
    assert any("figures/curves/path" in h for h in history)  # curves.png as a W&B image


def test_mlflow_shared_store_holds_every_run(write_config, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("first", "second"):
        run(
            write_config(
                {
                    "name": name,
                    "logging.loggers": ["jsonl", "mlflow"],
                    "optimizer.lr": 2e-3 if name == "first" else 1e-3,
                },
                f"{name}.yaml",
            )
        )
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tessera")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["first", "second"]
    assert {r.info.run_name: r.data.params["optimizer.lr"] for r in runs} == {
        "first": "0.002",
        "second": "0.001",
    }
    assert all(r.data.metrics["train/loss"] > 0 for r in runs)
    assert not (tmp_path / "runs/first/mlruns").exists()  # nothing in the run's own store
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"config.yaml", "curves.png"} <= artifacts


def test_curves_png_and_the_model_summary_are_in_the_run_folder(write_config, tmp_path):
    import numpy as np
    from PIL import Image

    run(write_config({"trainer.eval_every_n_steps": 10}))
    image = np.asarray(Image.open(tmp_path / "runs/tiny/curves.png").convert("RGB"))
    assert image.shape[0] > 200 and image.shape[1] > 600 and image.std() > 2
    summary = json.loads((tmp_path / "runs/tiny/run_info.json").read_text())["model_summary"]
    assert summary["parameters"] == summary["trainable"] == 2410
    assert {r["name"]: r["parameters"] for r in summary["layers"]}["model.net.1"] == 64 * 32 + 32
