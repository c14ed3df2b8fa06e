"""Opset 21: weights that fit 4 bits are INT4/UINT4 initializers; the graph computes the same."""
import builtins

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from tests.tiny_models import tiny_images, tiny_quantized
from zsq.errors import ZsqError
from zsq.export.onnx import export_onnx
from zsq.export.parity import ort_session, run_ort
from zsq.export.packing import unpack_codes
from zsq.export.runtimes import open_runtime, parse_runtimes
from zsq.export.weight_grid import weight_grid


def _inits(path):
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("preset,bits,dtype", [("genie", "w4a4", TensorProto.UINT4),
                                               ("deploy", "w4a8", TensorProto.INT4)])
def test_int4_round_trip(tmp_path, preset, bits, dtype):
    q = tiny_quantized(preset, bits)
    info21 = export_onnx(q, tmp_path / "m21.onnx")
    info17 = export_onnx(q, tmp_path / "m17.onnx", opset=17)
    model = onnx.load(str(tmp_path / "m21.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [21]
    inits = _inits(tmp_path / "m21.onnx")
    four = [i for i in inits.values() if i.data_type == dtype]
    # genie keeps the first and last layers at 8 bits; deploy quantizes every layer at w4
    n_layers = 3 if preset == "genie" else 5
    assert len(info21["int4_weights"]) == n_layers and len(four) == 2 * n_layers  # codes + zero points
    for name in info21["int4_weights"]:
        layer_name = name.rsplit(".weight_quant", 1)[0]
        codes = weight_grid(layer_name, q.get_submodule(layer_name)).codes
        t = inits[name]
        # stored packed, two codes a byte, low nibble first -- unpack with zsq's own unpacker
        raw = torch.from_numpy(np.frombuffer(t.raw_data, dtype=np.uint8).copy())
        assert len(t.raw_data) == (codes.numel() + 1) // 2
        nib = unpack_codes(raw, 4, 0, codes.numel()).reshape(codes.shape)
        if dtype == TensorProto.INT4:
            nib = torch.where(nib > 7, nib - 16, nib)
        assert torch.equal(nib.to(torch.int64), codes.to(torch.int64)), name
    assert info21["onnx_bytes"] < info17["onnx_bytes"]
    x = tiny_images(32, seed=5)
    a = run_ort(ort_session(tmp_path / "m21.onnx"), x)
    b = run_ort(ort_session(tmp_path / "m17.onnx"), x)
    assert np.array_equal(a, b)  # same arithmetic: only the storage changed


def test_unsupported_opset_is_refused_naming_the_range(tmp_path):
    q = tiny_quantized("genie", "w8a8")
    for bad in (12, 22):
        with pytest.raises(ZsqError, match="opsets 13-21"):
            export_onnx(q, tmp_path / "m.onnx", opset=bad)
    assert not (tmp_path / "m.onnx").exists()


def test_runtime_that_cannot_load_names_the_version_needed(tmp_path, monkeypatch):
    import onnxruntime as ort

    q = tiny_quantized("genie", "w4a4")
    export_onnx(q, tmp_path / "m.onnx")

    def old_runtime(*a, **k):
        raise RuntimeError("Could not find an implementation for DequantizeLinear(21) node\nmore")

    monkeypatch.setattr(ort, "InferenceSession", old_runtime)
    with pytest.raises(ZsqError, match=r"opset-21 graph .*DequantizeLinear\(21\).*onnxruntime >= 1\.18.*--opset 17"):
        ort_session(tmp_path / "m.onnx")
    with pytest.raises(ZsqError, match="onnxruntime >= 1.18"):
        open_runtime("ort", tmp_path / "m.onnx")


def test_runtime_names_and_missing_openvino(tmp_path, monkeypatch):
    assert parse_runtimes("all") == ("ort", "openvino") and parse_runtimes("ort") == ("ort",)
    with pytest.raises(ZsqError, match="unknown runtime"):
        parse_runtimes("tensorrt")
    real_import = builtins.__import__

    def no_openvino(name, *a, **k):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(ZsqError, match=r"pip install 'zsq\[openvino\]'"):
        open_runtime("openvino", tmp_path / "m.onnx")
