"""The catalog: built-ins found without importing them, and every parameter described."""

import inspect

import pytest

from src.core.registry import ALL, params_model
from src.run.catalog import builtin_names, load_builtins, parameters

load_builtins()
OWN = [
    (r, n)
    for r, reg in ALL.items()
    for n in reg.names()
    if getattr(reg.get(n), "__module__", "").startswith("src.")
]


@pytest.mark.parametrize("registry, name", OWN, ids=[f"{r}.{n}" for r, n in OWN])
def test_every_parameter_of_a_builtin_is_described_next_to_it(registry, name):
    """``--list`` shows what each parameter does; the text lives in the signature
    (``Annotated[..., Field(description=...)]``), not in a docstring that can drift from it."""
    reg = ALL[registry]
    entry = reg.get(name)
    fields = params_model(entry, reg.injected, reg.field_types(name)).model_fields
    bare = [p for p, f in fields.items() if not (f.description or "").strip()]
    assert not bare, f"{registry}.{name}: no description for {bare}"
    doc = inspect.getdoc(entry) or ""
    assert "Args:" not in doc, f"{registry}.{name}: parameters described twice (docstring Args:)"
    assert all(text for *_, text in parameters(entry, doc, reg.injected, reg.field_types(name)))


def test_the_source_reading_catalog_lists_what_importing_registers():
    names = builtin_names()
    for registry, reg in ALL.items():
        own = {n for n in reg.names() if getattr(reg.get(n), "__module__", "").startswith("src.")}
        assert own <= set(names[registry]) <= set(reg.names()), registry
