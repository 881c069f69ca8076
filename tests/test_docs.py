"""The documentation's promises: every command and example the pages show runs as shown.

Each page of ``docs/`` is followed as a reader would, top to bottom, in a fresh folder (holding
``configs/``, a small image folder ``photos/``, a config ``my.yaml``, an empty module
``my_pkg.my_module`` and the faulty ``my_components.py`` of an error example: the reader's own
files that the pages' examples name):

- ```` ```bash ```` blocks: every command runs and must succeed. Training commands get
  ``trainer.max_steps=3 trainer.compile=false`` appended (sweeps also ``trials=2``), so a page
  costs seconds, not the minutes its full runs take; launchers get a free port.
- ```` ```python ```` blocks: one whose first line is ``# path.py`` is written to that path (a
  later command runs or imports it); any other runs as a script and must succeed.
- ```` ```yaml ```` blocks: one whose first line is ``# path.yaml`` is written there (a shipped
  ``configs/`` file is compared instead: the page must show it as it is); one that is a shipped
  config (its ``name:``) must equal that file; a sweep file is checked by test_readme's sweep
  test; any other is a fragment, merged onto exp001 and validated as a config.
- ```` ```text ```` (and plain) blocks: each ``$ python -m src.main ...`` line followed by
  ``error: ...`` prints exactly that line and exits with 2.

What cannot run on one machine without a cluster (several hosts, a SLURM controller) is listed in
``NOT_HERE`` with the test that covers it instead; a command neither run nor listed fails.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, port

DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
FAST = ["trainer.max_steps=3", "trainer.compile=false"]
SUBCOMMANDS = ("predict", "export", "sweep", "prepare", "pack", "submit")

# commands that need more than one machine or a cluster: covered by the named tests instead
NOT_HERE = {
    "--rdzv-endpoint HOST:29500": "several hosts; tests/distributed/test_faults.py -k two_nodes",
    "--hostfile hostfile": "several hosts; the deepspeed launcher runs in test_multiprocess.py",
    "submit --config my.yaml strategy.type=fsdp": "a SLURM controller; tests/run/test_slurm.py",
    "submit --config my.yaml --wait": "a SLURM controller; tests/run/test_slurm.py",
    "sweep --config my_sweep.yaml --slurm": "a SLURM controller; tests/run/test_slurm.py",
}


def fenced(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S)


def shell_lines(body: str) -> list[str]:
    """A bash block's commands: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(re.split(r"\s{2,}#", line)[0].strip())
    return out


def all_commands() -> list[tuple[str, str]]:
    return [
        (page, command)
        for page in PAGES
        for lang, body in fenced((DOCS / page).read_text())
        if lang == "bash"
        for command in shell_lines(body)
    ]


def _body_of(path: Path) -> str:
    """A shipped config without its leading comment block, as the pages show it."""
    lines = path.read_text().splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "\n".join(lines).strip()


@functools.cache
def _shipped() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "configs").rglob("*.yaml"):
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and "name" in data:
            out[data["name"]] = path
    return out


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Reader:
    """Follows one page in a fresh folder."""

    def __init__(self, folder: Path, monkeypatch):
        from helpers import digits_folder

        self.folder = folder
        (folder / "configs").symlink_to(ROOT / "configs")
        digits_folder(folder / "photos", limit=200)
        (folder / "my.yaml").write_text("base: configs/exp001.yaml\nname: my\n")
        (folder / "my_pkg").mkdir()
        (folder / "my_pkg/__init__.py").write_text("")
        (folder / "my_pkg/my_module.py").write_text('"""Your own components."""\n')
        # the --import error example's module: line 12 uses a name it never imported
        (folder / "my_components.py").write_text(
            "import torch\n" + "\n" * 10 + "x = nn.Linear(1, 1)\n"
        )
        monkeypatch.chdir(folder)
        monkeypatch.syspath_prepend(str(folder))
        self.env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{folder}",
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
        }
        self.ran: list[str] = []

    def block(self, lang: str, body: str) -> None:
        first = body.splitlines()[0] if body.strip() else ""
        header = re.fullmatch(r"# ([\w./-]+\.(py|yaml))", first.strip())
        if lang == "python":
            if header:
                self._write(header.group(1), body)
            else:
                self._shell([sys.executable, "-c", body], "a python example")
        elif lang == "yaml":
            self._yaml(body, header.group(1) if header else None)
        elif lang in ("text", ""):
            self._errors(body)
        elif lang == "bash":
            for command in shell_lines(body):
                self.command(command)

    def _write(self, name: str, body: str) -> None:
        path = self.folder / name
        shipped = ROOT / name
        if name.startswith("configs/"):
            assert _body_of(shipped) == body.split("\n", 1)[1].strip(), f"{name} differs"
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)

    def _yaml(self, body: str, header: str | None) -> None:
        if header:
            return self._write(header, body)
        data = yaml.safe_load(body)
        if "space" in data or "experiment" in data:
            return  # a sweep file: test_readme.py checks it against exp001
        from src.run.experiment import prepare

        shipped = _shipped().get(data.get("name"))
        if shipped is not None:  # a shipped config: as the file says, and valid as shown
            if "base" not in data:
                file = yaml.safe_load(shipped.read_text())
                assert {k: data[k] for k in file if k in data} == file, shipped
            else:  # the file's own base, wherever this copy is
                data["base"] = str(shipped.parent / data["base"])
            path = self.folder / "shown.yaml"
            path.write_text(yaml.safe_dump(data))
            prepare(str(path), [])
            return
        path = self.folder / "fragment.yaml"
        base = yaml.safe_load((ROOT / "configs/exp001.yaml").read_text())
        path.write_text(yaml.safe_dump(_merge(base, data)))
        prepare(str(path), [])  # raises a one-line error if the fragment is not a valid config

    def _errors(self, body: str) -> None:
        from src.main import main

        for args, expected in re.findall(r"^\$ python -m src\.main (.*)\n(error: .*)$", body, re.M):
            err = io.StringIO()
            with redirect_stderr(err):  # bad input stops before anything is trained or written
                code = main(shlex.split(args) + FAST)
            assert code == 2 and err.getvalue().strip() == expected, (args, err.getvalue())

    def command(self, command: str) -> None:
        if any(marker in command for marker in NOT_HERE):
            return
        self.ran.append(command)
        if command == "python -m pytest -q":  # the suite itself: what CI runs
            assert command in (ROOT / ".ci/run").read_text()
            return
        if command.startswith("pip install"):
            # the set-up command: CI runs it (test_ci_runs_the_readme_commands); then its run
            install, _, then = command.partition("&&")
            assert install.strip() in (ROOT / ".ci/run").read_text(), command
            if then:
                self.command(then.strip())
            return
        argv = shlex.split(command)
        if argv[:3] == ["python", "-m", "src.main"]:
            return self._main(argv[3:])
        if argv[:3] == ["python", "-m", "benchmarks.run"]:
            return self._benchmarks(argv[3:])
        if argv[0] == "torchrun":
            module = argv.index("-m")
            argv = ["torchrun", f"--master-port={port()}", *argv[1:module], *argv[module:]]
            return self._shell(argv + self._shorten(argv[module + 2 :]), command)
        if argv[0] == "deepspeed":
            argv = ["deepspeed", f"--master_port={port()}", *argv[1:]]
            return self._shell(argv + FAST, command)
        if argv[0] == "python":
            return self._shell([sys.executable, *argv[1:]], command)
        return self._shell(["bash", "-c", command], command)

    def _shorten(self, args: list[str]) -> list[str]:
        if (
            not args
            or args[0] in ("predict", "export", "pack", "prepare", "submit")
            or ("--list" in args or "--status" in args or "--help" in args)
        ):
            return []
        if args[0] == "sweep":
            return ["trials=2", *FAST]
        return FAST

    def _main(self, args: list[str]) -> None:
        from src.main import main

        args = args + self._shorten(args)
        assert main(args) == 0, " ".join(args)

    def _benchmarks(self, args: list[str]) -> None:
        """Each section a page names exists and is run at a tiny size by test_benchmarks."""
        from test_benchmarks import SECTIONS

        from benchmarks.run import BENCHMARKS

        if "--only" in args:
            names = args[args.index("--only") + 1].split(",")
            assert set(names) <= set(BENCHMARKS), names
            assert set(names) <= set(SECTIONS) | {"lmspeed", "sslspeed"}

    def _shell(self, argv: list[str], what: str) -> None:
        proc = subprocess.run(
            argv, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"{what}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_every_command_and_example_of_a_page_runs(page, tmp_path, monkeypatch):
    reader = Reader(tmp_path, monkeypatch)
    for lang, body in fenced((DOCS / page).read_text()):
        reader.block(lang, body)


def test_commands_not_run_here_are_few_and_named():
    """Each NOT_HERE entry still names a command a page shows (no stale exemptions)."""
    commands = [c for _, c in all_commands()]
    for marker in NOT_HERE:
        assert any(marker in c for c in commands), marker
    assert len([c for c in commands if any(m in c for m in NOT_HERE)]) <= 6


def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: no broken link or anchor, every reference resolves."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "s")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    components = (tmp_path / "s/reference/components/index.html").read_text()
    from src.run.catalog import builtin_names

    for r_name, names in builtin_names().items():  # read from the source files, as --list does
        for name in names:
            assert f'id="{r_name}-{name}"' in components, f"{r_name}.{name}"
    cli = (tmp_path / "s/reference/cli/index.html").read_text()
    for command in SUBCOMMANDS:
        assert f"usage: python -m src.main {command}" in cli, command
    api = (tmp_path / "s/reference/api/index.html").read_text()
    for name in public_api():
        assert f'id="{name}"' in api, name


def public_api() -> list[str]:
    """Dotted paths of the Python API: src.__all__ and the classes components subclass, with
    every public method and property of each."""
    import inspect

    from src.algorithms.base import Task
    from src.core.callbacks.base import Callback
    from src.core.loggers import Logger
    from src.distributed.base import Strategy
    from src.run.api import Experiment

    out = []
    for cls in (Experiment, Task, Strategy, Callback, Logger):
        path = f"{cls.__module__}.{cls.__qualname__}"
        out.append(path)
        for name, member in vars(cls).items():
            if name.startswith("_") or not (
                inspect.isfunction(member)
                or isinstance(member, (property, classmethod, staticmethod))
            ):
                continue
            out.append(f"{path}.{name}")
    return out
