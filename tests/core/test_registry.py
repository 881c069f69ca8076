from typing import Literal

import pytest
from pydantic import BaseModel, conint

from src.core.errors import ConfigError
from src.core.registry import ALL, OPTIMIZERS, Registry


def make():
    reg = Registry("widgets", "test widgets", injected=("info",))

    @reg.register("box")
    class Box:
        def __init__(self, info, size: conint(gt=0) = 3, mode: Literal["a", "b"] = "a"):
            self.info, self.size, self.mode = info, size, mode

    @reg.register("free")
    def free(info, **kwargs):
        return kwargs

    return reg, Box


def test_build_validates_and_injects():
    reg, Box = make()
    box = reg.build({"type": "box", "size": "5"}, "widget", info="I")
    assert isinstance(box, Box) and box.size == 5 and box.info == "I" and box.mode == "a"


def test_duplicate_names_the_holding_module():
    reg, _ = make()
    with pytest.raises(ValueError, match=rf"'box', registered by module {__name__}"):
        reg.register("box")(lambda info: None)


def test_unknown_name_lists_and_suggests():
    reg, _ = make()
    with pytest.raises(ConfigError) as e:
        reg.get("bxo", "widget.type")
    msg = str(e.value)
    assert "widget.type: unknown widget 'bxo'" in msg and "did you mean 'box'" in msg
    assert "available: box, free" in msg


@pytest.mark.parametrize(
    "section,expected",
    [
        ({"type": "box", "size": -1}, "widget.size: Input should be greater than 0"),
        ({"type": "box", "size": "big"}, "widget.size: Input should be a valid integer"),
        ({"type": "box", "colour": 1}, "widget.colour: unknown key"),
        ({"type": "box", "mode": "c"}, "widget.mode: Input should be 'a' or 'b'"),
        ({"type": "box", "info": 1}, "widget.info: is set by the platform"),
        ({"size": 1}, "widget: expected a mapping with a 'type' key"),
    ],
)
def test_parameter_errors_carry_the_dotted_path(section, expected):
    reg, _ = make()
    with pytest.raises(ConfigError, match=expected):
        reg.validate(section, "widget")


def test_var_kwargs_accept_extra_keys():
    reg, _ = make()
    assert reg.build({"type": "free", "anything": 1}, info=None) == {"anything": 1}


def test_declared_params_model_wins():
    reg = Registry("things", "")

    class Params(BaseModel):
        model_config = {"extra": "forbid"}
        k: int

    @reg.register("t")
    def t(**kw):
        return kw

    t.params_model = Params
    with pytest.raises(ConfigError, match="things.k: required"):
        reg.validate({"type": "t"}, "things")


def test_type_is_never_an_import_path():
    reg, _ = make()
    with pytest.raises(ConfigError, match="unknown widget 'os.system'"):
        reg.build({"type": "os.system"}, info=None)


def test_every_torch_optimizer_is_registered_and_the_catalog_matches():
    import torch

    from src.core.optim import torch_optimizer_classes
    from src.run.catalog import builtin_names, load_builtins

    load_builtins()
    assert set(torch_optimizer_classes()) <= set(OPTIMIZERS.names())
    assert "lars" in OPTIMIZERS
    # --list reads names from source; they must equal what importing registers
    listed = builtin_names()
    for name, reg in ALL.items():
        builtin = {n for n in reg.names() if reg.get(n).__module__.startswith(("src.", "torch."))}
        assert set(listed[name]) == builtin, name
    assert OPTIMIZERS.get("adamw") is torch.optim.AdamW
