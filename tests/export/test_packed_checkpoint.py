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


# ---- values checked against what the files declare, not only against their hashes ------------------
def _rehash(d):
    """An edited checkpoint whose manifest was rewritten to match: the hashes pass, the values must not."""
    from zsq.export.manifest import file_entries

    m = json.loads((d / "manifest.json").read_text())
    m["files"] = file_entries(d, list(m["files"]))
    (d / "manifest.json").write_text(json.dumps(m))


def _edit_json(d, name, edit):
    data = json.loads((d / name).read_text())
    edit(data)
    (d / name).write_text(json.dumps(data))


def _edit_tensors(d, name, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / name))
    edit(tensors)
    save_file(tensors, str(d / name))


def _layer(quant, name):
    return next(e for e in quant["layers"] if e["name"] == name)


def _act_key(name, suffix):
    return f"{name}.{suffix}"


TAMPER = {
    "bits_other_than_the_config": (lambda d: _edit_json(d, QUANT_FILE, lambda q: _layer(q, "block.conv1").update(bits=5)),
                                   "layer block.conv1 declares 5-bit weights, its quantization config 4-bit"),
    "impossible_bits": (lambda d: _edit_json(d, QUANT_FILE, lambda q: _layer(q, "fc").update(bits=12)),
                        "layer fc declares an impossible grid (bits 12"),
    "code_range_wider_than_bits": (lambda d: _edit_json(d, QUANT_FILE, lambda q: _layer(q, "fc").update(qmax=4000)),
                                   "layer fc declares an impossible grid"),
    "numel": (lambda d: _edit_json(d, QUANT_FILE, lambda q: _layer(q, "fc").update(numel=7)),
              "layer fc declares 7 weights"),
    "negative_scale": (lambda d: _edit_tensors(d, PACKED_FILE, lambda t: t["fc.scale"].view(-1)[0].fill_(-1.0)),
                       "layer fc: scale is not finite and positive"),
    "nan_scale": (lambda d: _edit_tensors(d, PACKED_FILE, lambda t: t["fc.scale"].view(-1)[0].fill_(float("nan"))),
                  "layer fc: scale is not finite and positive"),
    "scale_shape": (lambda d: _edit_tensors(d, PACKED_FILE, lambda t: t.update({"fc.scale": torch.ones(3, 2)})),
                    "layer fc: scale of shape [3, 2] does not fit"),
    "fractional_zero_point": (lambda d: _edit_tensors(d, PACKED_FILE,
                                                      lambda t: t["fc.zero_point"].view(-1)[0].add_(0.5)),
                              "layer fc: zero point is not an integer in the declared code range"),
    "zero_point_off_the_grid": (lambda d: _edit_tensors(d, PACKED_FILE,
                                                        lambda t: t["fc.zero_point"].view(-1)[0].fill_(1000.0)),
                                "layer fc: zero point is not an integer in the declared code range"),
    "codes_not_uint8": (lambda d: _edit_tensors(d, PACKED_FILE, lambda t: t.update({"fc.codes": t["fc.codes"].int()})),
                        "layer fc: packed codes are torch.int32, not uint8"),
    "codes_missing": (lambda d: _edit_tensors(d, PACKED_FILE, lambda t: t.pop("fc.codes")),
                      "holds no fc.codes"),
    "act_scale_zero": (lambda d: _edit_tensors(d, STATE_FILE, lambda t: [v.zero_() for k, v in t.items()
                                                                         if k.endswith("input_quant.scale")]),
                       "input_quant: scale is not finite and positive"),
    "act_uncalibrated": (lambda d: _edit_tensors(d, STATE_FILE, lambda t: [v.fill_(False) for k, v in t.items()
                                                                           if k.endswith("quant.initialized")]),
                         "has no range (a saved model is always calibrated"),
    "act_bits": (lambda d: _edit_json(d, QUANT_FILE, lambda q: q["act_quantizers"][1].update(bits=2)),
                 "declares 2 bits, its quantization config"),
    "nan_in_the_float_state": (lambda d: _edit_tensors(d, STATE_FILE, lambda t: t[next(k for k in t if k.endswith(
        "bias") and t[k].is_floating_point())].view(-1)[0].fill_(float("inf"))), "holds NaN or inf"),
    "manifest_bits": (lambda d: _edit_json(d, "manifest.json", lambda m: m.update(bits="w2a2")),
                      "the manifest says 'w2a2', its quant.json 'w4a4'"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_values_are_checked_against_what_the_files_declare(tmp_path, saved, case):
    tamper, needle = TAMPER[case]
    d = _copy(saved[1], tmp_path)
    load_quantized(d, model_factory=_factory)  # the untouched copy loads
    tamper(d)
    _rehash(d)
    with pytest.raises(ZsqError) as err:
        load_quantized(d, model_factory=_factory)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


def test_codes_outside_a_narrowed_code_range_are_refused(tmp_path, saved):
    """Bits-packed codes always fit their width; a declared range narrower than the width must hold them too."""
    d = _copy(saved[1], tmp_path)
    quant = json.loads((d / QUANT_FILE).read_text())
    q = saved[0]
    for e in quant["layers"]:
        g = weight_grid(e["name"], q.get_submodule(e["name"]))
        if int(g.codes.max()) == e["qmax"] and float(g.zero_point.max()) < e["qmax"]:
            break
    else:
        pytest.skip("no layer whose codes reach qmax above its zero point")
    _edit_json(d, QUANT_FILE, lambda data: _layer(data, e["name"]).update(qmax=e["qmax"] - 1))
    _rehash(d)
    with pytest.raises(ZsqError, match=f"layer {e['name']}: codes .* leave the declared range"):
        load_quantized(d, model_factory=_factory)
