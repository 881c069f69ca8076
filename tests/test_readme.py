"""The README's promises: its set-up commands are the ones CI runs, and its examples work."""

import io
import re
import shlex
import sys
from contextlib import redirect_stderr

from conftest import ROOT
from helpers import metrics, run

README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_commands():
    block = re.search(r"## Set up.*?```bash\n(.*?)```", README, re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, "the README has exactly two set-up commands"
    ci = (ROOT / ".ci/run").read_text()
    for command in commands:
        assert command in ci


def test_the_add_your_own_algorithm_example_runs(tmp_path, monkeypatch):
    python = re.search(r"```python\n# my_lab/tasks.py\n(.*?)```", README, re.S).group(1)
    yaml_text = re.search(r"```yaml\n# my_experiment.yaml\n(.*?)```", README, re.S).group(1)
    (tmp_path / "my_lab").mkdir()
    (tmp_path / "my_lab/__init__.py").write_text("")
    (tmp_path / "my_lab/tasks.py").write_text(python)
    cfg = tmp_path / "my_experiment.yaml"
    cfg.write_text(yaml_text.replace("configs/exp001.yaml", str(ROOT / "configs/exp001.yaml")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run(cfg, "trainer.max_steps=4", f"logging.root={tmp_path / 'runs'}")
    rows = metrics(tmp_path / "runs/focal")
    assert rows[-1]["step"] == 4 and "val/accuracy" in rows[-1]


def test_the_error_examples_print_what_the_readme_shows(tmp_path, monkeypatch):
    """Each `$ python -m src.main ...` example under "The command line" and the line it prints."""
    from src.main import main

    section = README.split("## The command line", 1)[1].split("\n## ", 1)[0]
    pairs = re.findall(r"^\$ python -m src\.main (.*)\n(error: .*)$", section, re.M)
    assert len(pairs) >= 3
    # the example's own module: line 12 uses a name it never imported
    (tmp_path / "my_components.py").write_text(
        "import torch\n" + "\n" * 10 + "x = nn.Linear(1, 1)\n"
    )
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    for args, expected in pairs:
        sys.modules.pop("my_components", None)
        err = io.StringIO()
        with redirect_stderr(err):
            code = main(shlex.split(args) + ["--dry-run"])
        assert code == 2 and err.getvalue().strip() == expected, (args, err.getvalue())


def test_the_predict_and_export_examples_run(tmp_path, monkeypatch):
    """Every command of "Predict" and "Export" on exp001 (the others need other runs), on a short
    exp001 run in a fresh folder; each writes what it says."""
    from src.main import main

    monkeypatch.chdir(tmp_path)
    run(
        ROOT / "configs/exp001.yaml",
        "trainer.max_steps=20",
        "trainer.max_epochs=null",
        "logging.loggers=[jsonl]",
    )
    commands = []
    for section in ("Predict", "Export"):
        block = re.search(rf"## {section}\n\n```bash\n(.*?)```", README, re.S).group(1)
        commands += [
            line.split("  #")[0].strip()
            for line in block.splitlines()
            if "experiments/exp001" in line
            and line.startswith("python -m src.main")
            and "--data" not in line
        ]
    assert len(commands) == 7
    for command in commands:
        argv = shlex.split(command)[3:]
        before = {p for p in tmp_path.rglob("*") if p.is_file()}
        assert main(argv) == 0, command
        assert {p for p in tmp_path.rglob("*") if p.is_file()} - before, command


def test_the_sweep_example_is_a_valid_sweep_of_exp001(tmp_path):
    """The sweep file shown under "Sweeps" passes the whole space check against exp001."""
    from pathlib import Path

    from src.run.sweep_config import check_space, load_sweep
    from src.run.sweep_study import make_pruner, make_sampler

    section = README.split("## Sweeps", 1)[1].split("\n## ", 1)[0]
    text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "sweep.yaml"
    path.write_text(text.replace("exp001.yaml", str(ROOT / "configs/exp001.yaml")))
    sweep, experiment, overrides = load_sweep(path)
    assert Path(experiment) == ROOT / "configs/exp001.yaml" and sweep.trials == 24
    check_space(sweep, path, experiment, overrides)
    make_sampler(sweep), make_pruner(sweep)
    shipped = (ROOT / "configs/sweep_exp001.yaml").read_text()
    for line in ("metric: val/accuracy", "method: tpe", "trials: 24", "pruner: {type: hyperband}"):
        assert line in shipped and line in text


def test_the_images_at_scale_commands_run(tmp_path):
    """The four commands of "Images at scale" on a small folder: train from it, pack it, train
    from the shards, train with the decode cache."""
    from helpers import digits_folder

    from src.main import main

    block = re.search(r"### Images at scale.*?```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 4
    digits_folder(tmp_path / "photos", limit=200)
    for n, command in enumerate(commands):
        command = command.replace("photos-shards/", f"{tmp_path}/photos-shards/")
        command = command.replace("photos/", f"{tmp_path}/photos/")
        args = shlex.split(command)[3:]  # after `python -m src.main`
        if args[0] != "pack":
            args += ["trainer.max_steps=2", f"logging.root={tmp_path}/runs", f"name=r{n}"]
        assert main(args) == 0, command
    assert len(list((tmp_path / "runs").iterdir())) == 3
