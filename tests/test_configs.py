"""Every YAML in configs/ runs for a few steps (STYLE: the override table as integration tests)."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from helpers import metrics, run

ALL_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SWEEPS = [p for p in ALL_CONFIGS if p.stem.startswith("sweep_")]
CONFIGS = [p for p in ALL_CONFIGS if p not in SWEEPS]
SMOKE = [
    "trainer.max_steps=3",
    "trainer.max_epochs=null",
    "trainer.log_every=1",
    "checkpoint.every_n_steps=2",
]


# What a config needs from earlier steps (a pretrained base, a data file), made small here.
NEEDS_BASE = {"lora_email", "dpo_docstrings", "ppo_docstrings"}
NEEDS_ARITH = {"grpo_arith"}  # the supervised arithmetic GPT, with its character tokenizer
NEEDS_VLM = {"vlm_digits_stage1", "vlm_digits"}  # the lm_stdlib GPT, a clip run, stage 1
FASTER = {  # the same code paths on less data
    # compiled: tests/algorithms/test_causal_lm.py checks that compiling keeps the loss curve
    "lm_stdlib": ["data.max_files=20", "trainer.compile=false"],
    "minilm_docstrings": ["data.packages=[json,http]", "data.max_length=32", "data.batch_size=8"],
}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A 1-layer GPT and its BPE tokenizer saved as a transformers folder, plus DPO pairs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from benchmarks.dpo_data import write_pairs
    from src.data.text import resolve_files, train_tokenizer

    folder = tmp_path_factory.mktemp("base")
    tok = train_tokenizer(resolve_files(["stdlib:json"]), 400)
    tok.save_pretrained(str(folder))
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=128)
    ).save_pretrained(str(folder))
    write_pairs(folder / "pairs.jsonl", limit=24)
    return folder


@pytest.fixture(scope="module")
def arith_base(tmp_path_factory) -> Path:
    """A 1-layer GPT with the arithmetic data's character tokenizer, as a transformers folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from src.data.arithmetic import char_tokenizer

    folder = tmp_path_factory.mktemp("arith")
    tok = char_tokenizer()
    tok.save_pretrained(str(folder))
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=16)
    ).save_pretrained(str(folder))
    return folder


def needs(path: Path, request) -> list[str]:
    extra = list(FASTER.get(path.stem, []))
    if path.stem in NEEDS_VLM:
        base = request.getfixturevalue("tiny_base")
        lm = {"type": "hf", "kind": "causal_lm", "path": str(base)}
        if path.stem == "vlm_digits":
            lm["adapter"] = {"type": "lora", "r": 4, "target_modules": ["c_attn"]}
        extra += [
            f"data.tokenizer={base}",
            f"task.lm={json.dumps(lm)}",
            "task.vision_init=null",
            "task.init=null",
        ]  # stage 2 from a stage 1 run: tests/algorithms/test_vlm.py
    if path.stem in NEEDS_BASE | NEEDS_ARITH:
        base = request.getfixturevalue("arith_base" if path.stem in NEEDS_ARITH else "tiny_base")
        extra += [f"model.path={base}", f"data.tokenizer={base}"]  # needs: no longer read
        if path.stem == "dpo_docstrings":
            extra.append(f"data.path={base / 'pairs.jsonl'}")
    return extra


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs_a_few_steps(path: Path, tmp_path, request):
    run(path, *SMOKE, *needs(path, request), f"logging.root={tmp_path}", "logging.loggers=[jsonl]")
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert (run_dir / "checkpoints/step_00000003/COMMIT").exists()


OVERRIDES = [
    ["trainer.precision=bf16"],
    ["trainer.grad_accum_steps=2", "data.batch_size=32"],
    ["model={type: mlp, hidden: [64]}"],
    ["optimizer={type: sgd, lr: 0.05, momentum: 0.9}"],
    ["scheduler={type: onecycle}"],
    ["trainer.eval_every_n_steps=2"],
]


@pytest.mark.parametrize("overrides", OVERRIDES, ids=[" ".join(o) for o in OVERRIDES])
def test_exp001_with_overrides(overrides, tmp_path):
    run(
        ROOT / "configs/exp001.yaml",
        *SMOKE,
        *overrides,
        f"logging.root={tmp_path}",
        "logging.loggers=[jsonl]",
    )
    assert metrics(tmp_path / "exp001")[-1]["step"] == 3


@pytest.mark.parametrize("name", sorted(NEEDS_BASE | NEEDS_ARITH | NEEDS_VLM))
def test_a_config_that_needs_another_run_names_the_commands(name, tmp_path, monkeypatch, capsys):
    """On a fresh clone these configs stop at once, with the commands that make what they read."""

    from src.main import main

    monkeypatch.chdir(tmp_path)  # no experiments/ here, as on a fresh clone
    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    needs = raw["needs"]
    if "base" in raw:  # a base's needs come first, then the config's own
        needs = {**yaml.safe_load((ROOT / "configs" / raw["base"]).read_text())["needs"], **needs}
    assert main(["--config", str(ROOT / "configs" / f"{name}.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: needs: {path} does not exist yet; make it with: {command}"
        for path, command in needs.items()
    ]
    assert not (tmp_path / "experiments").exists()
    for command in needs.values():  # each named command is one this platform has
        for part in command.split(" && "):
            assert part.startswith(("python -m src.main ", "python -m benchmarks.")), part


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[p.stem for p in ALL_CONFIGS])
def test_config_header_says_what_it_trains_and_how_to_run_it(path: Path):
    """A config's opening comment says what it trains and gives the command; tuning history and
    results belong in benchmarks/RESULTS.md, not in the header."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    command = "sweep --config" if path in SWEEPS else "--config"
    assert header, f"{path.name}: no opening comment"
    assert any(f"python -m src.main {command} configs/{path.name}" in line for line in header)
    assert len(header) <= 6, f"{path.name}: {len(header)} comment lines; move notes to RESULTS.md"


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_config_runs_two_short_trials(path: Path, tmp_path, capsys):
    """Every sweep in configs/ validates its space and runs two trials of a few steps."""
    from src.main import main

    assert (
        main(
            [
                "sweep",
                "--config",
                str(path),
                "trials=2",
                *SMOKE,
                f"logging.root={tmp_path}",
                "logging.loggers=[jsonl]",
            ]
        )
        == 0
    )
    name = yaml.safe_load(path.read_text())["name"]
    assert (tmp_path / name / "trials.csv").read_text().count("\n") == 3
    assert (tmp_path / name / "best.yaml").exists()
