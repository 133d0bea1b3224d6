"""One qualified-name resolver for the whole project (registry, platforms, workers,
attention backends, communicators): nested classes resolve with dots or a colon."""

from __future__ import annotations

import sys

import pytest
from plugin_fixtures.helpers import write_module

import registry


@pytest.fixture
def nested_module(tmp_path, monkeypatch):
    write_module(tmp_path / "qn_pkg", "__init__", "")
    write_module(tmp_path / "qn_pkg", "mod", """
        class Outer:
            class Inner:
                class Deepest:
                    pass
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "qn_pkg.mod"
    for name in ("qn_pkg.mod", "qn_pkg"):
        sys.modules.pop(name, None)


def test_engine_uses_the_registry_resolver():
    from engine import utils

    assert utils.resolve_obj_by_qualname is registry.resolve_qualname


@pytest.mark.parametrize("spelling", ["qn_pkg.mod.Outer.Inner.Deepest", "qn_pkg.mod:Outer.Inner.Deepest"])
def test_nested_classes_resolve_either_way(nested_module, spelling):
    from engine.utils import resolve_obj_by_qualname

    resolved = resolve_obj_by_qualname(spelling)
    assert resolved.__qualname__ == "Outer.Inner.Deepest"
    assert resolved.__module__ == "qn_pkg.mod"


def test_missing_attribute_and_module_name_the_qualname(nested_module):
    with pytest.raises(ImportError, match=r"'qn_pkg.mod.Outer.Nope'.*has no attribute path 'Outer.Nope'"):
        registry.resolve_qualname("qn_pkg.mod.Outer.Nope")
    with pytest.raises(ImportError, match="no importable module"):
        registry.resolve_qualname("qn_missing_pkg.mod.Cls")


def test_attention_backend_registered_from_a_nested_class(nested_module,
                                                         attention_backends_restored):
    from engine.attention.registry import AttentionBackendEnum, register_backend

    outer = registry.resolve_qualname("qn_pkg.mod.Outer")
    register_backend("QN_NESTED")(outer.Inner)
    member = AttentionBackendEnum["QN_NESTED"]
    assert member.get_path() == "qn_pkg.mod.Outer.Inner"
    assert member.get_class() is outer.Inner
