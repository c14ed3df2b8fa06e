import pytest

from zsq.errors import ZsqError
from zsq.quant import QuantConfig, get_preset, list_presets, parse_bits


@pytest.mark.parametrize("text,expected", [("w4a4", (4, 4)), ("W2A4", (2, 4)), ("w8a8", (8, 8)), (" w5a5 ", (5, 5))])
def test_parse_bits(text, expected):
    assert parse_bits(text) == expected


@pytest.mark.parametrize("text,msg", [("4/4", "malformed"), ("w4", "malformed"), ("w1a4", "weight bits"),
                                      ("w4a9", "activation bits"), ("w16a16", "weight bits")])
def test_bad_bits(text, msg):
    with pytest.raises(ZsqError, match=msg):
        parse_bits(text)


def test_presets_listed_and_versioned():
    presets = list_presets()
    assert {"genie", "gdfq"} <= set(presets)
    cfg = get_preset("genie", "w3a3")
    assert cfg.preset == "genie" and cfg.version >= 1 and cfg.bits == "w3a3"
    assert cfg.describe() == f"genie@v{cfg.version} w3a3"


def test_config_round_trips_through_dict():
    for name in ("genie", "gdfq"):
        cfg = get_preset(name, "w2a4")
        assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset():
    with pytest.raises(ZsqError, match="unknown preset 'foo'"):
        get_preset("foo")


def test_layer_bits_resolution_for_genie():
    cfg = get_preset("genie", "w4a4")
    assert cfg.layer_bits("conv1", 0, 10) == (8, 4, False)
    assert cfg.layer_bits("layer1.0.conv1", 1, 10) == (4, 8, True)
    assert cfg.layer_bits("layer2.0.conv1", 5, 10) == (4, 4, True)
    assert cfg.layer_bits("fc", 9, 10) == (8, 8, True)
