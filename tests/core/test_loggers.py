import json

import yaml

from helpers import run


def test_tensorboard_and_mlflow_are_readable_by_their_own_tools(write_config, tmp_path):
    run(write_config({"logging.loggers": ["console", "jsonl", "tensorboard", "mlflow"],
                      "trainer.eval_every_n_steps": 10}))
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
