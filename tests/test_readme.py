"""The README's promises: its set-up commands are the ones CI runs, its commands and examples
work as the docs pages' do (tests/test_docs.py reads it the same way), and the sweep file the
docs show is a valid sweep of exp001."""

import re

import pytest
from conftest import ROOT
from test_docs import Reader, fenced

README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_commands():
    block = re.search(r"## Set up.*?```bash\n(.*?)```", README, re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, "the README has exactly two set-up commands"
    ci = (ROOT / ".ci/run").read_text()
    for command in commands:
        assert command in ci


@pytest.mark.slow
def test_every_command_and_example_of_the_readme_runs(tmp_path, monkeypatch):
    reader = Reader(tmp_path, monkeypatch)
    for lang, body in fenced(README):
        reader.block(lang, body)
    assert len(reader.ran) >= 8


def test_the_readme_is_short_and_links_into_the_docs():
    lines = README.splitlines()
    assert len(lines) <= 160
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert sum(link.startswith("docs/") for link in links) >= 10
    for link in links:
        if "://" not in link:
            assert (ROOT / link).exists(), link


def test_the_sweep_example_is_a_valid_sweep_of_exp001(tmp_path):
    """The sweep file shown in the Sweeps guide passes the whole space check against exp001."""
    from pathlib import Path

    from src.run.sweep_config import check_space, load_sweep
    from src.run.sweep_study import make_pruner, make_sampler

    page = (ROOT / "docs/guides/sweeps.md").read_text()
    text = next(body for lang, body in fenced(page) if lang == "yaml" and "space:" in body)
    path = tmp_path / "sweep.yaml"
    path.write_text(text.replace("exp001.yaml", str(ROOT / "configs/exp001.yaml")))
    sweep, experiment, overrides = load_sweep(path)
    assert Path(experiment) == ROOT / "configs/exp001.yaml" and sweep.trials == 24
    check_space(sweep, path, experiment, overrides)
    make_sampler(sweep), make_pruner(sweep)
    shipped = (ROOT / "configs/sweep_exp001.yaml").read_text()
    for line in ("metric: val/accuracy", "method: tpe", "trials: 24", "pruner: {type: hyperband}"):
        assert line in shipped and line in text
