import json
import shutil

import pytest
import torch

from tests.tiny_models import tiny_factory, tiny_images, tiny_quantized
from zsq.errors import ZsqError
from zsq.export import load_quantized, save_quantized
from zsq.export.packed_checkpoint import PACKED_FILE, QUANT_FILE, STATE_FILE
from zsq.export.frozen import FrozenWeightQuantizer
from zsq.export.manifest import FORMAT_VERSION
from zsq.export.weight_grid import weight_grid
from zsq.quant import get_preset, quant_layers, quantize_model


def _factory(name):
    assert name == "tiny_resnet"
    return tiny_factory(seed=123)  # different random init: everything must come from the checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    q = tiny_quantized("genie", "w4a4")
    d = tmp_path_factory.mktemp("ckpt") / "q"
    info = save_quantized(q, d, model_name="tiny_resnet", info={"method": "test"})
    return q, d, info


@pytest.mark.parametrize("preset", ["genie", "gdfq"])
@pytest.mark.parametrize("bits", ["w4a4", "w8a8", "w3a5"])
def test_roundtrip_bit_identical(tmp_path, preset, bits):
    q = tiny_quantized(preset, bits)
    x = tiny_images(8, seed=3)
    with torch.no_grad():
        y = q(x)
    save_quantized(q, tmp_path / "c", model_name="tiny_resnet")
    loaded = load_quantized(tmp_path / "c", model_factory=_factory)
    with torch.no_grad():
        y2 = loaded(x)
    assert torch.equal(y, y2)
    assert not torch.equal(y, _factory("tiny_resnet")(x))  # the random init was really overwritten
    # same integer codes through the generic interface, and shared input quantizers shared again
    for (n, a), (_, b) in zip(quant_layers(q), quant_layers(loaded)):
        assert isinstance(b.weight_quant, FrozenWeightQuantizer)
        assert torch.equal(weight_grid(n, a).codes, weight_grid(n, b).codes), n
        assert torch.equal(weight_grid(n, b).codes, b.weight_quant.int_repr(b.weight)), n
    for sharer, owner in q.zsq_quant_plan["shared_input_quantizers"]:
        assert loaded.get_submodule(sharer).input_quant is loaded.get_submodule(owner).input_quant


def test_resave_loaded_model_is_identical(tmp_path, saved):
    q, d, _ = saved
    loaded = load_quantized(d, model_factory=_factory)
    save_quantized(loaded, tmp_path / "again", model_name="tiny_resnet")
    again = load_quantized(tmp_path / "again", model_factory=_factory)
    x = tiny_images(4, seed=9)
    with torch.no_grad():
        assert torch.equal(q(x), again(x))
    for f in (PACKED_FILE, STATE_FILE):
        assert (d / f).read_bytes() == (tmp_path / "again" / f).read_bytes()


def test_manifest_contents(saved):
    q, d, info = saved
    m = json.loads((d / "manifest.json").read_text())
    assert m["format"] == "zsq-quantized-checkpoint" and m["format_version"] == FORMAT_VERSION
    assert m["model_name"] == "tiny_resnet" and m["bits"] == "w4a4" and m["preset"] == "genie"
    assert m["info"] == {"method": "test"}
    assert set(m["files"]) == {PACKED_FILE, STATE_FILE, QUANT_FILE}
    assert m["packed_bytes"] == sum((d / f).stat().st_size for f in m["files"]) == info["packed_bytes"]
    n_w = sum(l.weight.numel() for _, l in quant_layers(q))
    assert m["fp32_bytes"] > 4 * n_w
    # the genie preset keeps the first and last layer at 8 bits, the rest at 4
    quant = json.loads((d / QUANT_FILE).read_text())
    bits = {e["name"]: e["bits"] for e in quant["layers"]}
    assert bits["conv1"] == 8 and bits["fc"] == 8 and bits["block.conv1"] == 4
    assert quant["config"]["preset"] == "genie"
    assert all(a["bits"] in (4, 8) and a["scale"] for a in quant["act_quantizers"])


def test_packed_codes_are_smaller_than_fp32(tmp_path):
    # all layers at 4 bits (gdfq preset): the codes take 1/8 of the FP32 weight bytes
    q = tiny_quantized("gdfq", "w4a4")
    info = save_quantized(q, tmp_path / "c", model_name="tiny_resnet")
    n_w = sum(l.weight.numel() for _, l in quant_layers(q))
    assert info["packed_weight_bytes"] == sum(-(-l.weight.numel() * 4 // 8) for _, l in quant_layers(q))
    assert info["packed_weight_bytes"] <= 4 * n_w / 8 + len(quant_layers(q))


# ---- bad input -------------------------------------------------------------------------------
def _copy(d, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(d, dst)
    return dst


def test_refuses_non_empty_out_dir_and_writes_nothing_on_error(tmp_path, saved):
    q = saved[0]
    out = tmp_path / "busy"
    out.mkdir()
    (out / "other.txt").write_text("x")
    with pytest.raises(ZsqError, match="not empty"):
        save_quantized(q, out, model_name="tiny_resnet")
    assert sorted(p.name for p in out.iterdir()) == ["other.txt"]
    save_quantized(q, out, model_name="tiny_resnet", force=True)  # forced: replaces only its own files
    assert (out / "other.txt").exists() and (out / "manifest.json").exists()
    # an uncalibrated model is refused before anything is written
    raw = quantize_model(tiny_factory(), get_preset("genie", "w4a4"))
    with pytest.raises(ZsqError, match="never initialised"):
        save_quantized(raw, tmp_path / "raw", model_name="tiny_resnet")
    assert not (tmp_path / "raw").exists()
    assert not any(p.name.startswith(".zsq-save-") for p in tmp_path.iterdir())
    with pytest.raises(ZsqError, match="not a zsq quantized model"):
        save_quantized(tiny_factory(), tmp_path / "fp", model_name="tiny_resnet")


def test_inexact_weight_quantizer_is_named(tmp_path, saved):
    q = tiny_quantized("genie", "w4a4")
    layer = q.get_submodule("block.conv2")

    class Noisy(torch.nn.Module):
        bits, qmin, qmax = 4, 0, 15

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def int_repr(self, w):
            return self.inner.int_repr(w)

        def qparams(self, w):
            return self.inner.qparams(w)

        def forward(self, w):
            return self.inner(w) * 1.001

    layer.weight_quant = Noisy(layer.weight_quant)
    with pytest.raises(ZsqError, match="block.conv2"):
        save_quantized(q, tmp_path / "c", model_name="tiny_resnet")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ZsqError, match="does not exist"):
        load_quantized(tmp_path / "nope", model_factory=_factory)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZsqError, match="not a zsq checkpoint"):
        load_quantized(tmp_path / "empty", model_factory=_factory)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ZsqError, match="not a zsq checkpoint"):
        load_quantized(tmp_path / "other", model_factory=_factory)
    (tmp_path / "other" / "manifest.json").write_text("{not json")
    with pytest.raises(ZsqError, match="not valid JSON"):
        load_quantized(tmp_path / "other", model_factory=_factory)


def test_newer_format_version(tmp_path, saved):
    d = _copy(saved[1], tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ZsqError, match="newer"):
        load_quantized(d, model_factory=_factory)


def test_truncated_tampered_missing(tmp_path, saved):
    d = _copy(saved[1], tmp_path)
    data = (d / PACKED_FILE).read_bytes()
    (d / PACKED_FILE).write_bytes(data[:-10])
    with pytest.raises(ZsqError, match=f"{PACKED_FILE}.*truncated"):
        load_quantized(d, model_factory=_factory)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    (d / PACKED_FILE).write_bytes(bytes(flipped))
    with pytest.raises(ZsqError, match=f"{PACKED_FILE}.*sha256"):
        load_quantized(d, model_factory=_factory)
    (d / PACKED_FILE).write_bytes(data)
    (d / QUANT_FILE).unlink()
    with pytest.raises(ZsqError, match=f"missing file {QUANT_FILE}"):
        load_quantized(d, model_factory=_factory)


def test_wrong_architecture(tmp_path, saved):
    from tests.tiny_models import TinyResNet, TINY_META
    from zsq.models.meta import set_meta

    with pytest.raises(ZsqError, match="shape|does not fit"):
        load_quantized(saved[1], model_factory=lambda n: set_meta(TinyResNet(c=4).eval(), TINY_META))


def test_codes_follow_the_forward_not_int_repr(tmp_path):
    """A weight exactly on a rounding boundary: the saved codes are what the forward used."""
    q = tiny_quantized("genie", "w8a8")
    layer = q.get_submodule("fc")
    s, z = layer.weight_quant.qparams(layer.weight)
    with torch.no_grad():  # put every weight of row 0 half a step above a grid point
        layer.weight[0] = ((torch.arange(layer.weight.shape[1]) % 5 - 2) + 0.5) * s[0, 0]
    grid = weight_grid("fc", layer)
    assert torch.equal((grid.codes.float() - grid.zero_point) * grid.scale, layer.quantized_weight())
    save_quantized(q, tmp_path / "c", model_name="tiny_resnet")
    loaded = load_quantized(tmp_path / "c", model_factory=_factory)
    x = tiny_images(4)
    with torch.no_grad():
        assert torch.equal(q(x), loaded(x))


def test_rebuild_through_model_zoo(tmp_path):
    """No factory: the architecture comes from zsq.models.load(model_name) (random init, no assets)."""
    from zsq.models import load
    from zsq.quant import calibrate_from_bn

    q = quantize_model(load("cifar10_resnet20"), get_preset("gdfq", "w4a4"))
    calibrate_from_bn(q, k=4.0, seed=0)
    info = save_quantized(q, tmp_path / "r20", model_name="cifar10_resnet20")
    assert info["size_ratio"] < 0.25
    loaded = load_quantized(tmp_path / "r20")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(q(x), loaded(x))
