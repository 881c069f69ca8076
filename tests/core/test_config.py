import pytest
import yaml

from src.core.config import dump_config, load_config, parse_override
from src.core.errors import ConfigError
from src.run.experiment import prepare


def test_base_inheritance_deep_merges_and_records_sources(tmp_path, write_config):
    base = write_config({"optimizer.weight_decay": 0.5}, name="base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nname: child\noptimizer: {lr: 0.1}\nmodel: {hidden: [8]}\n")
    cfg, origins = load_config(child)
    assert cfg.name == "child"
    assert cfg.optimizer == {"type": "adamw", "lr": 0.1, "weight_decay": 0.5}  # merged
    assert cfg.model == {"type": "mlp", "hidden": [8]}  # lists replace
    assert origins["optimizer.lr"] == str(child) and origins["optimizer.weight_decay"] == str(base)


def test_a_changed_type_replaces_the_inherited_section(tmp_path, write_config):
    write_config({"model": {"type": "cnn", "channels": [4]}}, name="base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nmodel: {type: mlp, hidden: [8]}\n")
    cfg, _ = load_config(child)
    assert cfg.model == {"type": "mlp", "hidden": [8]}


def test_overrides_win_and_parse_yaml_values(write_config):
    path = write_config()
    cfg, origins = load_config(
        path,
        [
            "trainer.max_steps=7",
            "optimizer.lr=3e-4",
            "model.hidden=[16,16]",
            "trainer.max_epochs=2",
        ],
    )
    assert cfg.trainer.max_steps == 7 and cfg.trainer.max_epochs == 2
    assert cfg.optimizer["lr"] == 3e-4 and cfg.model["hidden"] == [16, 16]
    assert origins["model.hidden"] == "override 'model.hidden=[16,16]'"


def test_parse_override_rejects_malformed():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="expected key.path=value"):
            parse_override(bad)


def test_cycle_in_base_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["trainer.foo=1"], r"override 'trainer.foo=1': trainer.foo: unknown key"),
        (["optimizer.lr=fast"], r"optimizer.lr: Input should be a valid number.*'fast'"),
        (["data.batch_size=-4"], r"data.batch_size: Input should be greater than 0 \(got -4\)"),
        (["model.type=mlpp"], r"model.type: unknown model 'mlpp'; did you mean 'mlp'"),
        (["model.hiden=[3]"], r"model.hiden: unknown key"),
        (["nothere.x=1"], r"nothere: unknown key"),
        (["optimizer.lr.x=1"], r"optimizer.lr is not a mapping"),
        (["trainer.precision=fp8"], r"trainer.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        (["name=a/b"], r"name: Value error, must be letters"),
        (["callbacks=[{type: nope}]"], r"callbacks.0.type: unknown callback 'nope'"),
    ],
)
def test_each_error_names_its_source_and_path(write_config, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        prepare(str(write_config()), overrides)


def test_unknown_key_in_file_names_the_file(tmp_path, write_config):
    path = write_config({"trainer.colour": "red"})
    with pytest.raises(ConfigError, match=rf"{path}: trainer.colour: unknown key"):
        load_config(path)


def test_several_problems_one_line_each(write_config):
    with pytest.raises(ConfigError) as e:
        prepare(str(write_config()), ["optimizer.lr=x", "scheduler.warmup_steps=y"])
    assert len(e.value.lines) == 2


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", "config file is empty"),
        ("name: x\nmodel: {type: mlp\n", r":3:1: invalid YAML"),
        ("- a\n- b\n", "expected a mapping at the top"),
        ("name: x\nmodel: !!python/object/apply:os.system ['echo hacked > {p}']\n", "invalid YAML"),
    ],
)
def test_bad_files(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("{p}", str(tmp_path / "hacked")))
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    assert not (tmp_path / "hacked").exists()


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("nope.yaml")


def test_dump_round_trips(write_config):
    cfg, _ = load_config(write_config())
    again = yaml.safe_load(dump_config(cfg))
    assert again["trainer"]["max_steps"] == 20 and again["trainer"]["precision"] == "fp32"


@pytest.mark.parametrize(
    "strategy",
    [{"type": "fsdp"}, {"type": "deepspeed", "config": {"zero_optimization": {"stage": 3}}}],
)
def test_qlora_with_a_sharding_strategy_is_one_line(write_config, strategy):
    """QLoRA's 4-bit weights cannot be sharded: refused before anything is built."""
    model = {
        "type": "hf",
        "kind": "causal_lm",
        "adapter": {"type": "qlora"},
        "config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8},
    }
    with pytest.raises(ConfigError) as err:
        prepare(str(write_config({"model": model, "strategy": strategy})))
    assert len(err.value.lines) == 1 and "model.adapter.type: qlora" in err.value.lines[0]


def test_unknown_keys_suggest_the_closest_and_every_problem_comes_at_once(write_config, capsys):
    from src.main import main

    code = main(
        [
            "--config",
            str(write_config()),
            "traner.max_steps=5",
            "trainer.max_step=5",
            "trainer.log_evry=3",
            "optimizer.lrr=1",
            "--dry-run",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    for expected in (
        "traner: unknown key; did you mean 'trainer'?",
        "trainer.max_step: unknown key; did you mean 'max_steps'?",
        "trainer.log_evry: unknown key; did you mean 'log_every'?",
        "optimizer.lrr: unknown key; did you mean 'lr'?",
    ):  # a component's too
        assert expected in err, err
    assert all(line.startswith("error: ") for line in err.splitlines())


def test_a_type_override_replaces_the_component(write_config):
    from src.core.config import load_config

    path = write_config({"model": {"type": "cnn", "channels": [8], "dropout": 0.2}})
    cfg, _ = load_config(path, ["model.hidden=[4]", "model.type=mlp"])  # order does not matter
    assert cfg.model == {"type": "mlp", "hidden": [4]}
    cfg, _ = load_config(path, ["model.dropout=0.3"])  # the same type still merges
    assert cfg.model == {"type": "cnn", "channels": [8], "dropout": 0.3}
    cfg, _ = load_config(path, ["model={type: mlp, hidden: [2]}"])
    assert cfg.model == {"type": "mlp", "hidden": [2]}


@pytest.mark.parametrize("also_bad_trainer", [False, True])
def test_bad_keys_in_data_a_logger_and_a_sampler_come_at_once(write_config, also_bad_trainer):
    """The dataset's, a logger's and a sampler's parameters are checked with the rest, both
    when the config is otherwise valid and when the schema itself already failed."""
    path = write_config(
        {
            "data.resize_to": 3,
            "data.sampler": {"type": "pk", "classes_per_bach": 2},
            "logging.loggers": ["console", {"type": "jsonl", "bogus": 1}],
        }
    )
    with pytest.raises(ConfigError) as err:
        prepare(str(path), ["trainer.max_stepz=3"] if also_bad_trainer else [])
    lines = err.value.lines
    assert any("data.resize_to: unknown key; did you mean 'resize'?" in ln for ln in lines)
    assert any("data.sampler.classes_per_bach: unknown key" in ln for ln in lines)
    assert any("logging.loggers.1.bogus: unknown key" in ln for ln in lines)
    assert len(lines) == 3 + also_bad_trainer, lines


def test_what_a_strategy_cannot_run_is_its_own_rule():
    """The combination rules live with the strategies: core's config knows no strategy name."""
    import inspect

    import src.core.config as config
    from src.core.loop_settings import LoopSettings
    from src.distributed.ddp import DDPStrategy
    from src.distributed.deepspeed import DeepSpeedStrategy
    from src.distributed.fsdp import FSDPStrategy

    assert not any(
        name in inspect.getsource(config) for name in ('"fsdp"', '"deepspeed"', '"qlora"')
    )
    fp16 = LoopSettings(precision="fp16", weights_dtype="fp16")
    assert DDPStrategy.config_errors({}, fp16) and FSDPStrategy.config_errors({}, fp16)
    assert DeepSpeedStrategy.config_errors({}, fp16) == []  # it scales fp16 itself
    qlora = LoopSettings(adapter="qlora")
    assert FSDPStrategy.config_errors({}, qlora) and not DDPStrategy.config_errors({}, qlora)
    zero = {"config": {"zero_optimization": {"stage": 2}}}
    assert DeepSpeedStrategy.config_errors(zero, qlora) == []
    zero["config"]["zero_optimization"]["stage"] = 3
    assert "ZeRO stage 3" in DeepSpeedStrategy.config_errors(zero, qlora)[0]
