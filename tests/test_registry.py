"""The one Registry behind models, presets, synthesizers, methods and block types."""
import pytest

from zsq.errors import ZsqError
from zsq.registry import Registry


def test_register_get_list():
    r = Registry("widget")
    r.register("b", 2)
    r.register("a", 1)
    assert r.get("a") == 1 and r.names() == ["a", "b"] and list(r.items()) == ["a", "b"]
    assert "a" in r and "c" not in r and len(r) == 2
    assert r.names("b*") == ["b"]


def test_duplicate_name_is_an_error_same_value_is_not():
    r = Registry("widget")
    r.register("a", 1)
    r.register("a", 1)  # re-importing a module registers the same value again
    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        r.register("a", 2)
    assert r.get("a") == 1
    with pytest.raises(ValueError, match="non-empty"):
        r.register("", 3)


def test_unknown_name_says_what_is_close_and_what_exists():
    r = Registry("widget", hint=" (see docs)")
    for n in ("genie", "zeroq", "gdfq"):
        r.register(n, n)
    with pytest.raises(ZsqError, match=r"unknown widget 'gene'\. Did you mean: genie\? Choose one of: "
                                       r"gdfq, genie, zeroq \(see docs\)$"):
        r.get("gene")
    with pytest.raises(ZsqError, match=r"unknown widget 'xyz'\. Choose one of"):
        r.get("xyz")


def test_every_registry_is_filled_by_its_package():
    import zsq  # noqa: F401  (the package import fills every registry)
    from zsq.methods.registry import METHODS
    from zsq.models.registry import MODELS
    from zsq.ptq.units import BLOCK_TYPES
    from zsq.quant.qconfig import PRESETS
    from zsq.synth.base import SYNTHESIZERS

    assert {"cifar10_resnet20", "efficientnet_lite0"} <= set(MODELS.names())
    assert {"genie", "gdfq", "brecq", "qdrop"} <= set(PRESETS.names())
    assert SYNTHESIZERS.names() == ["gdfq", "genie", "hast", "noise", "synq", "zeroq"]
    assert {"bn-minmax", "minmax", "genie", "brecq", "qdrop", "adaround", "gdfq", "ait", "hast", "synq"} <= set(METHODS)
    assert "BasicBlock" in BLOCK_TYPES
    with pytest.raises(ValueError, match="method 'genie' registered twice"):
        METHODS.register("genie", METHODS.get("bn-minmax"))


def test_cli_and_bench_choices_come_from_the_registry():
    from zsq.bench.suites import Cell
    from zsq.cli import build_parser
    from zsq.synth.base import SYNTHESIZERS

    sub = build_parser()._subparsers._group_actions[0].choices["synthesize"]
    method = next(a for a in sub._actions if a.dest == "method")
    assert list(method.choices) == SYNTHESIZERS.names()
    SYNTHESIZERS.register("test-only-synth", object)
    try:
        assert Cell("cifar10_resnet20", "genie", "w4a4", data="test-only-synth").data == "test-only-synth"
    finally:
        SYNTHESIZERS._items.pop("test-only-synth")
    with pytest.raises(ZsqError, match="data must be none, real or one of gdfq, genie"):
        Cell("cifar10_resnet20", "genie", "w4a4", data="dream")
