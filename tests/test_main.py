"""The command line, run as users run it: in a subprocess."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from src.main import main


def test_help_and_list_import_no_torch(cli):
    """What keeps --help and --list fast: they import no heavy library (the time itself is
    benchmarks/RESULTS.md's "Start-up", not a timed test: a loaded machine would fail it)."""
    out = cli("--help")
    assert out.returncode == 0 and "--dry-run" in out.stdout
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, src.main as m\n"
            "try: m.main(['--list'])\nexcept SystemExit: pass\n"
            "print('torch' in sys.modules, 'timm' in sys.modules, 'transformers' in sys.modules)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip().splitlines()[-1] == "False False False"


def test_list_all_and_one(cli):
    out = cli("--list")
    assert out.returncode == 0
    for name in (
        "digits",
        "cnn",
        "mlp",
        "timm",
        "classification",
        "adamw",
        "lars",
        "warmup_cosine",
        "single",
        "jsonl",
    ):
        assert f"  {name} " in out.stdout
    one = cli("--list", "schedulers")
    assert "onecycle" in one.stdout and "adamw" not in one.stdout
    bad = cli("--list", "model")
    assert bad.returncode == 2 and "did you mean 'models'" in bad.stderr


def test_dry_run_reports_sizes_and_writes_nothing(cli, write_config, tmp_path):
    out = cli(
        "--config",
        str(write_config()),
        "--dry-run",
        "trainer.max_steps=1000",
        "trainer.max_epochs=3",
    )
    assert out.returncode == 0, out.stderr
    assert "1,438 train, 359 val" in out.stdout
    assert "steps/epoch     44" in out.stdout and "total steps     132" in out.stdout
    assert "parameters" in out.stdout
    # the model summary (every module with the prefix its parameter names start with) and the
    # optimizer's groups
    assert re.search(r"^ +model\.net\.1 +Linear +2,080 +2,080$", out.stdout, re.M)
    assert "total: 2,410 parameters, 2,410 trainable, 0.01 MB" in out.stdout
    assert re.search(r"^optimizer \(adamw\) +no_decay +2 +42 +0\.001 +0$", out.stdout, re.M)
    assert not (tmp_path / "runs").exists()


def test_the_installed_command_is_the_command_line(write_config, tmp_path):
    tessera = Path(sys.executable).parent / "tessera"
    assert tessera.exists(), "pip install -e . installs the `tessera` command"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # (an editable install elsewhere)
    out = subprocess.run(
        [str(tessera), "--config", str(write_config()), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0 and "total steps     20" in out.stdout, out.stderr
    bad = subprocess.run(
        [str(tessera), "--config", str(write_config()), "optimizer.lr=-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: override 'optimizer.lr=-1'")


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
    changes = {
        "model": {"type": "user_linear", "scale": 2.0},
        "task": {"type": "user_task"},
        "trainer.max_steps": 6,
    }
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


@pytest.mark.parametrize("stem", ["json", "tokenizers"])
def test_a_plugin_file_named_like_a_module_does_not_replace_it(cli, write_config, tmp_path, stem):
    """A plugin called json.py (standard library) or tokenizers.py (installed, used by the
    platform) is imported under its own name: the run ends normally and the real module keeps
    working (its run record and the tokenizer-free digits run both need json)."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{stem}.py").write_text(PLUGIN)
    changes = {
        "model": {"type": "user_linear"},
        "task": {"type": "user_task"},
        "trainer.max_steps": 4,
    }
    out = cli("--import", str(folder / f"{stem}.py"), "--config", str(write_config(changes)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert json.loads((tmp_path / "runs/tiny/run_info.json").read_text())["params"]
    rows = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").open()]
    assert rows[-1]["step"] == 4


def test_import_of_a_file_keeps_sys_path_and_the_real_module(tmp_path, monkeypatch):
    import sys

    from src.run.plugins import import_user_modules, plugin_module_name

    (tmp_path / "json.py").write_text(
        PLUGIN.replace("user_linear", "json_linear").replace("user_task", "json_task")
    )
    before = list(sys.path)
    import_user_modules([str(tmp_path / "json.py")], "--import")
    monkeypatch.chdir(tmp_path)
    import_user_modules(["json.py"], "--import")  # the same file again: imported once
    assert sys.path[: len(before)] == before  # nothing put in front
    import json as real

    assert real.dumps({"a": 1}) == '{"a": 1}' and sys.modules["json"] is real
    assert plugin_module_name(tmp_path / "json.py") in sys.modules
    from src.core.registry import MODELS

    assert "json_linear" in MODELS


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
    (["--config", "{ok}", "imports=[no_such_module_xyz]"], "imports.0: no module"),
    (["--config", "{ok}", "trainer.max_steps=null"], "set max_steps or max_epochs"),
    (["{ok}"], "--config: required"),
]


@pytest.mark.parametrize("args,expected", BAD, ids=[e for _, e in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    capsys, write_config, tmp_path, args, expected
):
    """In-process for speed; test_bad_input_in_a_real_process covers the process boundary."""
    from src.main import main

    (tmp_path / "bad.yaml").write_text("name: x\nmodel: {type: mlp\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "tag.yaml").write_text(
        f"name: x\nmodel: !!python/object/apply:os.system ['touch {tmp_path}/pwned']\n"
    )
    paths = {
        "ok": write_config(),
        "bad": tmp_path / "bad.yaml",
        "empty": tmp_path / "empty.yaml",
        "tag": tmp_path / "tag.yaml",
    }
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
        "error: override 'optimizer.lr=fast': optimizer.lr: Input should be a valid number, "
        "unable to parse string as a number (got 'fast')"
    ]
    assert not (tmp_path / "runs").exists()


# Each class of bad input the config fuzzer (tests/test_main_fuzz.py) found, by name.
LAUGHS = (
    "["
    + ", ".join(
        ["&a0 [x, x, x, x, x, x, x, x, x]"]
        + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]
    )
    + "]"
)
CLASSES = {
    "yaml_tag_int": (["trainer.max_steps=!!int x"], "invalid YAML value: ValueError"),
    "yaml_tag_float": (["optimizer.lr=!!float abc"], "invalid YAML value: ValueError"),
    "yaml_tag_bool": (["trainer.compile=!!bool maybe"], "invalid YAML value: KeyError"),
    "yaml_tag_timestamp": (["name=!!timestamp x"], "invalid YAML value"),
    "yaml_huge_integer": (["trainer.max_steps=" + "9" * 5000], "Exceeds the limit"),
    "yaml_binary_value": (["name=!!binary aGk="], "a YAML bytes is not a config value"),
    "deep_nesting": (["model.hidden=" + "[" * 3000 + "]" * 3000], "nested deeper than 32"),
    "self_alias": (["model=&m {type: mlp, me: *m}"], "refers to itself"),
    "deep_override_path": ([".".join(["a"] * 1500) + "=1"], "key path is deeper than 32"),
    "alias_bomb_override": (["model.x=" + LAUGHS], "more than 100,000 values"),
    "alias_bomb_file": ("{laughs}", "more than 100,000 values"),
    "base_not_a_name": ("{base5}", "base: expected a config file name"),
    "base_nul_byte": ("{base_nul}", "base: expected a config file name"),
    "base_too_long": ("{base_long}", "base: expected a config file name"),
    "config_path_too_long": ("x" * 5000, "cannot read the config file: File name too long"),
    "import_empty": (["--import", ""], "'' is not a module name"),
    "import_relative": (["--import", ".rel"], "'.rel' is not a module name"),
    "import_syntax_error": (["--import", "{syntax}"], "bad_syntax.py:1: SyntaxError"),
    "import_raises": (["--import", "{raises}"], "bad_raise.py:2: RuntimeError: boom"),
    "import_missing": (["--import", "no_such_mod_xyz"], "no module 'no_such_mod_xyz' in the"),
    "lr_negative": (["optimizer.lr=-1"], "optimizer.lr: Input should be greater than 0"),
    "lr_nan": (["optimizer.lr=.nan"], "optimizer.lr: Input should be a finite number"),
    "betas_out_of_range": (["optimizer.betas=[2, 0.9]"], "optimizer.betas.0: Input should be less"),
    "eps_negative": (["optimizer.eps=-1"], "optimizer.eps: Input should be greater than or"),
    "weight_decay_negative": (["optimizer.weight_decay=-1"], "optimizer.weight_decay: Input"),
    "seed_negative": (["seed=-1"], "seed: Input should be greater than or equal to 0"),
    "seed_too_large": (["seed=18446744073709551616"], "seed: Input should be less than"),
    "device_unknown": (["strategy.device=nope"], "strategy.device: 'nope' is not a device"),
    "device_missing": (["strategy.device=cuda:7"], "strategy.device: cuda:7 does not exist"),
    "width_unallocatable": (["model.hidden=[100000000000000]"], "model: RuntimeError:"),
    "width_overflow": (["model.hidden=[1000000000000000000000000000000]"], "model: "),
    "depth_unbounded": (
        ["task={type: mae, decoder_depth: 2147483648}"],  # looped for minutes
        "task.decoder_depth: Input should be less than or equal to 64",
    ),
    "unknown_flag": (["--trainer.max_steps=5"], "unrecognized arguments: --trainer.max_steps=5"),
    "newline_in_value": (['name="a\\nb"'], "(got 'a\\nb')"),
    "nul_byte_in_file": ("{nul}", "invalid YAML: unacceptable character #x0000"),
    "duplicate_key": ("{dup}", "duplicate key 'trainer' (first given on line"),
    "name_too_long": (["name=" + "n" * 300], "name: String should have at most 128"),
    "strategie_grammar": (["strategy.type=nope"], "unknown strategy 'nope'"),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_each_class_of_bad_input_is_one_line(name, capsys, write_config, tmp_path, monkeypatch):
    from src.main import main

    args, expected = CLASSES[name]
    ok = write_config()
    files = {
        "laughs": f"name: x\nbomb: {LAUGHS}\n",
        "base5": "base: 5\n",
        "base_nul": 'base: "a\\0b"\n',
        "base_long": f"base: {'b' * 5000}\n",
        "nul": "name: x\x00\n",
        "dup": ok.read_text() + "trainer: {max_steps: 5}\n",
    }
    for key, text in files.items():
        (tmp_path / f"{key}.yaml").write_text(text)
    (tmp_path / "bad_syntax.py").write_text("def broken(:\n    pass\n")
    (tmp_path / "bad_raise.py").write_text("import os\nraise RuntimeError('boom')\n")
    monkeypatch.chdir(tmp_path)
    paths = {"syntax": "bad_syntax.py", "raises": "bad_raise", **{k: f"{k}.yaml" for k in files}}
    fill = lambda a: paths.get(a[1:-1], a) if a.startswith("{") else a  # noqa: E731
    if isinstance(args, str):  # a config file of its own
        argv = ["--config", fill(args), "--dry-run"]
    else:
        argv = ["--config", str(ok), *map(fill, args), "--dry-run"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    sys.modules.pop("bad_raise", None)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert len(lines[0]) <= 520 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == before


def test_yaml_1_2_scalars_dates_and_off_stay_strings():
    from src.core.config import yaml_load

    assert yaml_load("{a: off, b: yes, c: 2026-01-01, d: true, e: 3e-4}") == {
        "a": "off",
        "b": "yes",
        "c": "2026-01-01",
        "d": True,
        "e": 3e-4,
    }


def test_library_output_before_a_config_error_is_held_back(
    capsys, write_config, monkeypatch, tmp_path
):
    """A library that prints while a bad config is built leaves only the error line."""
    import src.core.registry as registry
    from src.main import main

    real = registry.Registry.build

    def noisy(self, section, path=None, **kw):
        if path == "model":  # as a library loading a model would
            print("Loading weights: 100%|##########|", file=sys.stderr)
        return real(self, section, path, **kw)

    monkeypatch.setattr(registry.Registry, "build", noisy)
    assert (
        main(["--config", str(write_config()), "model.hidden=[100000000000000]", "--dry-run"]) == 2
    )
    assert capsys.readouterr().err.startswith("error: model: RuntimeError")
    assert main(["--config", str(write_config()), "--dry-run"]) == 0
    assert "Loading weights" in capsys.readouterr().err  # a good dry run shows what was printed
    assert main(["--config", str(write_config()), "trainer.max_steps=2"]) == 0
    assert "Loading weights" not in capsys.readouterr().err  # a run logs it: log.txt
    assert "Loading weights" in (tmp_path / "runs/tiny/log.txt").read_text()


LIST_PLUGIN = '''
from src.algorithms.classification import Classification
from src.core.registry import TASKS


@TASKS.register("mine")
class Mine(Classification):
    """My own task, documented.

    Args:
        k: how many.
    """

    def __init__(self, model, k: int = 3):
        super().__init__(model)
'''


def test_list_shows_summaries_parameters_and_plugins(capsys, tmp_path, monkeypatch):
    from src.main import main

    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "losses:" not in out and "rewards:" in out  # empty registries are left out
    assert "  mae                    Masked autoencoder: a ViT encodes" in out
    assert "docstring opening of standard-library functions." in out  # not cut mid-sentence
    assert main(["--list", "tasks.simclr"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n  temperature +float >0 +0\.2 +softmax temperature", out), out
    assert main(["--list", "optimizers.adamw"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n  lr +float >0 +0\.001 +learning rate", out), out
    assert re.search(r"\n  betas +.* +\(0\.9, 0\.999\) +coefficients used", out), out
    (tmp_path / "list_plugin.py").write_text(LIST_PLUGIN)
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["--list", "tasks", "--import", "list_plugin"]) == 0
        assert "  mine                   My own task, documented." in capsys.readouterr().out
        assert main(["--list", "tasks.mine", "--import", "list_plugin"]) == 0
        assert re.search(r"\n  k +int +3 +how many\.", capsys.readouterr().out)
    finally:
        from src.core.registry import TASKS

        TASKS._entries.pop("mine", None)
        sys.modules.pop("list_plugin", None)


def test_a_misspelt_flag_or_config_file_gets_a_suggestion(capsys):
    from src.main import main

    assert main(["--confg", "configs/exp001.yaml"]) == 2
    assert "unrecognized arguments: --confg; did you mean --config?" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "configs/exp01.yaml"), "--dry-run"]) == 2
    assert f"did you mean {ROOT / 'configs/exp001.yaml'}?" in capsys.readouterr().err


def test_overrides_may_come_before_and_after_flags(tmp_path, capsys):
    """`--config C a=1 --dry-run b=2`: both overrides apply (argparse alone stops at b=2)."""
    from src.main import main

    assert (
        main(
            [
                "--config",
                str(ROOT / "configs/exp001.yaml"),
                "trainer.max_steps=7",
                "--dry-run",
                "name=late",
                f"logging.root={tmp_path}",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "experiment      late" in out and "total steps     7" in out


TYPO_TASK = """
from src.core.registry import TASKS
from src.algorithms.classification import Classification


@TASKS.register("typo_task")
class TypoTask(Classification):
    def configure(self, info):
        super().configure(info)
        self.extra = nn.Linear(3, 4)  # nn was never imported: a bug, not a config value
"""


def test_a_bug_in_a_users_task_is_shown_as_a_program_error(cli, write_config, tmp_path):
    """A NameError inside a user's Task is a traceback and exit 1, with what libraries printed;
    not a one-line config error that sends the user looking for a bad YAML value."""
    (tmp_path / "typo_plugin.py").write_text(TYPO_TASK)
    out = cli(
        "--import",
        str(tmp_path / "typo_plugin.py"),
        "--config",
        str(write_config({"task": {"type": "typo_task"}})),
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback (most recent call last)" in out.stderr
    assert 'typo_plugin.py", line 10, in configure' in out.stderr
    assert out.stderr.strip().endswith("NameError: name 'nn' is not defined")
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_bug_in_a_strategy_is_a_program_error(write_config, monkeypatch):
    from src.distributed.single import SingleDeviceStrategy

    def broken(self, task, make_optimizer=None):
        return task.no_such_attribute

    monkeypatch.setattr(SingleDeviceStrategy, "wrap", broken)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        main(["--config", str(write_config())])


VIT = {
    "type": "timm",
    "name": "vit_tiny_patch16_224",
    "img_size": 8,
    "patch_size": 2,
    "embed_dim": 50,
    "depth": 1,
    "num_heads": 3,
}


def test_a_value_a_library_refuses_is_one_line_and_traceback_shows_where(
    write_config, tmp_path, capsys
):
    cfg = str(write_config({"model": VIT}))
    assert main(["--config", cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: model: AssertionError: dim should be divisible by num_heads "
        "(--traceback shows where it was raised)"
    ]
    assert main(["--config", cfg, "--traceback"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "timm" in err
    assert err.strip().splitlines()[-1] == (
        "error: model: AssertionError: dim should be "
        "divisible by num_heads (--traceback shows where it "
        "was raised)"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "exc, program",
    [
        (NameError("x"), True),
        (AttributeError("x"), True),
        (KeyError("x"), True),
        (TypeError("x"), True),
        (AssertionError("x"), True),
        (NotImplementedError("x"), True),
        (ValueError("x"), False),
        (RuntimeError("x"), False),
        (MemoryError(), False),
        (OSError("x"), False),
    ],
)
def test_errors_raised_in_own_code_are_program_errors_unless_refusals(exc, program):
    from src.core.errors import is_program_error

    try:
        raise exc
    except BaseException as caught:  # raised here, in the project's own code
        assert is_program_error(caught) is program


def test_errors_raised_inside_a_library_are_refusals():
    import json as std

    from src.core.errors import is_program_error

    for bad in ("{", None):
        try:
            std.loads(bad)  # JSONDecodeError (a ValueError) / TypeError raised by the library
        except Exception as caught:
            assert not is_program_error(caught), caught


@pytest.mark.parametrize(
    "typo, command", [("pak", "pack"), ("sumbit", "submit"), ("predcit", "predict")]
)
def test_a_mistyped_command_names_the_closest(typo, command, capsys):
    from src.main import main

    assert main([typo, "--from", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {typo}: not a command; did you mean '{command}'? (commands: predict, "
        "export, sweep, prepare, pack, submit)"
    ]
