"""The command line, run as users run it: in a subprocess."""
import json
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT


def test_help_is_fast_and_imports_no_torch(cli):
    t0 = time.perf_counter()
    out = cli("--help")
    assert out.returncode == 0 and "--dry-run" in out.stdout
    assert time.perf_counter() - t0 < 5  # benchmarks/ holds the real figure; this catches regressions
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, src.main as m\n"
         "try: m.main(['--list'])\nexcept SystemExit: pass\n"
         "print('torch' in sys.modules, 'timm' in sys.modules, 'transformers' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True)
    assert probe.stdout.strip().splitlines()[-1] == "False False False"


def test_list_all_and_one(cli):
    out = cli("--list")
    assert out.returncode == 0
    for name in ("digits", "cnn", "mlp", "timm", "classification", "adamw", "lars",
                 "warmup_cosine", "single", "jsonl"):
        assert f"  {name} " in out.stdout
    one = cli("--list", "schedulers")
    assert "onecycle" in one.stdout and "adamw" not in one.stdout
    bad = cli("--list", "model")
    assert bad.returncode == 2 and "did you mean 'models'" in bad.stderr


def test_dry_run_reports_sizes_and_writes_nothing(cli, write_config, tmp_path):
    out = cli("--config", str(write_config()), "--dry-run", "trainer.max_steps=1000",
              "trainer.max_epochs=3")
    assert out.returncode == 0, out.stderr
    assert "1,438 train, 359 val" in out.stdout
    assert "steps/epoch     44" in out.stdout and "total steps     132" in out.stdout
    assert "parameters" in out.stdout
    assert not (tmp_path / "runs").exists()


PLUGIN = '''
import torch
from torch import nn
from src.core.registry import MODELS, TASKS
from src.algorithms.classification import Classification


@MODELS.register("user_linear")
def user_linear(info, scale: float = 1.0):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, info.num_classes))


@TASKS.register("user_task")
class UserTask(Classification):
    """A user's task: classification with a tag."""
'''


@pytest.mark.parametrize("how", ["yaml", "flag"])
def test_user_module_registers_components(cli, write_config, tmp_path, how):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    changes = {"model": {"type": "user_linear", "scale": 2.0}, "task": {"type": "user_task"},
               "trainer.max_steps": 6}
    if how == "yaml":
        changes["imports"] = ["my_plugin"]
        args = ["--config", str(write_config(changes))]
    else:
        args = ["--import", "my_plugin", "--config", str(write_config(changes))]
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").open()]
    assert rows[-1]["step"] == 6
    listed = cli("--import", "my_plugin", "--list", "models", cwd=tmp_path)
    assert "user_linear" in listed.stdout


def test_plugin_entry_point_group(tmp_path, write_config, monkeypatch):
    """A package advertising ``src.plugins`` is imported without any config line."""
    pkg = tmp_path / "site"
    (pkg / "ep_plugin").mkdir(parents=True)
    (pkg / "ep_plugin/__init__.py").write_text(PLUGIN.replace("user_linear", "ep_linear"))
    dist = pkg / "ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[src.plugins]\nep = ep_plugin\n")
    cfg = write_config({"model": {"type": "ep_linear"}, "task": {"type": "classification"}})
    from conftest import run_cli

    out = run_cli("--config", str(cfg), "--dry-run", env={"PYTHONPATH": f"{ROOT}:{pkg}"})
    assert out.returncode == 0, out.stderr


BAD = [
    (["--config", "missing.yaml"], "missing.yaml: config file not found"),
    (["--config", "{bad}"], "invalid YAML"),
    (["--config", "{empty}"], "config file is empty"),
    (["--config", "{ok}", "trainer.nope=1"], "trainer.nope: unknown key"),
    (["--config", "{ok}", "model.type=resnet"], "unknown model 'resnet'"),
    (["--config", "{ok}", "optimizer.lr=fast"], "optimizer.lr: Input should be a valid number"),
    (["--config", "{ok}", "data.batch_size=-4"], "data.batch_size: Input should be greater than 0"),
    (["--config", "{ok}", "not.a.path=1"], "not: unknown key"),
    (["--config", "{tag}"], "could not determine a constructor for the tag"),
    (["--config", "{ok}", "data.batch_size=5000"], "data.batch_size: 5000 is larger than"),
    (["--config", "{ok}", "checkpoint.resume=/no/such/dir"], "checkpoint.resume: not a directory"),
    (["--config", "{ok}", "imports=[no_such_module_xyz]"], "imports.0: cannot import"),
    (["--config", "{ok}", "trainer.max_steps=null"], "set max_steps or max_epochs"),
    (["{ok}"], "--config: required"),
]


@pytest.mark.parametrize("args,expected", BAD, ids=[e for _, e in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, write_config, tmp_path, args,
                                                         expected):
    """In-process for speed; test_bad_input_in_a_real_process covers the process boundary."""
    from src.main import main

    (tmp_path / "bad.yaml").write_text("name: x\nmodel: {type: mlp\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "tag.yaml").write_text(
        f"name: x\nmodel: !!python/object/apply:os.system ['touch {tmp_path}/pwned']\n")
    paths = {"ok": write_config(), "bad": tmp_path / "bad.yaml", "empty": tmp_path / "empty.yaml",
             "tag": tmp_path / "tag.yaml"}
    code = main([a.format(**paths) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pwned").exists()


def test_bad_input_in_a_real_process(cli, write_config, tmp_path):
    out = cli("--config", str(write_config()), "optimizer.lr=fast")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: override 'optimizer.lr=fast': optimizer.lr: Input should be a valid number, "
        f"unable to parse string as a number (got 'fast')"]
    assert not (tmp_path / "runs").exists()
