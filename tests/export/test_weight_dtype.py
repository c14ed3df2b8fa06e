"""8-bit weights are stored so that every CPU runs the graph exactly (--weight-dtype portable), or as
int8 for CPUs with VNNI (--weight-dtype int8).

onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI add pairs of products in saturating int16
(2 * 255 * 127 > 32767): CI on such a CPU saw top-1 agreement 0.875 where a VNNI CPU gives 1.0. The
portable file has no int8 weight whose codes could saturate, whatever CPU runs these tests."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.tiny_models import tiny_images, tiny_quantized
from zsq.errors import ZsqError
from zsq.export.onnx import SATURATION_SAFE_CODE, export_onnx
from zsq.export.parity import check_parity
from zsq.export.runtimes import cpu_has_int8_dot, int8_weight_names, open_runtime
from zsq.quant.inventory import quant_layers


def _weights(path):
    """{codes initializer: (codes, zero point)} of every weight DequantizeLinear."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Identity"}
    return {n.input[0]: (inits[n.input[0]], inits[alias.get(n.input[2], n.input[2])])
            for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}


def test_portable_8bit_weights_are_uint8_with_the_same_values(tmp_path):
    q = tiny_quantized("deploy", "w8a8")
    export_onnx(q, tmp_path / "p.onnx", opset=17)
    export_onnx(q, tmp_path / "s.onnx", opset=17, weight_dtype="int8")
    portable, signed = _weights(tmp_path / "p.onnx"), _weights(tmp_path / "s.onnx")
    assert portable.keys() == signed.keys() and len(portable) == len(list(quant_layers(q)))
    for name, (codes, zp) in portable.items():
        s_codes, s_zp = signed[name]
        assert s_codes.dtype == np.int8 and np.abs(s_codes.astype(int)).max() > SATURATION_SAFE_CODE, name
        assert codes.dtype == np.uint8 and (zp == 128).all(), name
        # the same integers: u8 code - 128 = s8 code, and the zero point moves with them
        assert np.array_equal(codes.astype(int) - 128, s_codes.astype(int)) and (s_zp == 0).all(), name
    assert int8_weight_names(tmp_path / "p.onnx") == [] and len(int8_weight_names(tmp_path / "s.onnx")) == len(signed)


def test_seven_bit_weights_stay_int8_in_the_portable_file(tmp_path):
    """The route to int8 kernels that are exact everywhere: codes in [-64, 63] cannot saturate."""
    q = tiny_quantized("deploy", "w7a8")
    info = export_onnx(q, tmp_path / "m.onnx", opset=17)
    assert info["uint8_shifted_weights"] == []
    codes = [c for c, _ in _weights(tmp_path / "m.onnx").values()]
    assert codes and all(c.dtype == np.int8 and np.abs(c.astype(int)).max() <= SATURATION_SAFE_CODE for c in codes)
    w8 = export_onnx(tiny_quantized("deploy", "w8a8"), tmp_path / "m8.onnx", opset=17)
    assert len(w8["uint8_shifted_weights"]) == len(codes)


def test_the_portable_graph_computes_the_model_exactly_in_onnxruntime(tmp_path):
    """On any CPU (CI has no VNNI): the bar the int8 graph misses there."""
    q = tiny_quantized("deploy", "w8a8")
    export_onnx(q, tmp_path / "m.onnx")
    res = check_parity(q, tmp_path / "m.onnx", tiny_images(64, seed=4), threads=1)
    assert res["top1_agreement"] == 1.0 and res["max_rel_logit_diff"] < 1e-4, res
    assert res["integer_ops"].get("QLinearConv") == 4, res["integer_ops"]


def test_narrow_weights_keep_int8_and_int4():
    """Codes within [-64, 64] cannot saturate: W4 weights stay INT4 at opset 21, W7 and less int8."""
    import tempfile
    from pathlib import Path

    q = tiny_quantized("deploy", "w4a8")
    with tempfile.TemporaryDirectory() as d:
        info = export_onnx(q, Path(d) / "m.onnx")
        assert len(info["int4_weights"]) == len(list(quant_layers(q)))
        export_onnx(q, Path(d) / "m17.onnx", opset=17)
        assert all(c.dtype == np.int8 for c, _ in _weights(Path(d) / "m17.onnx").values())


def test_a_bad_weight_dtype_is_a_one_line_error(tmp_path):
    with pytest.raises(ZsqError, match="weight dtype 'u8' is not one of portable, int8"):
        export_onnx(tiny_quantized("deploy", "w8a8"), tmp_path / "m.onnx", weight_dtype="u8")
    assert not (tmp_path / "m.onnx").exists()


def test_openvino_runs_the_int8_graph_in_int8_and_the_portable_one_exactly(tmp_path):
    pytest.importorskip("openvino")
    q = tiny_quantized("deploy", "w8a8")
    x = tiny_images(16, seed=6)
    with torch.no_grad():
        ref = q(x).numpy()
    export_onnx(q, tmp_path / "p.onnx")
    got = open_runtime("openvino", tmp_path / "p.onnx", threads=1)(x.numpy())
    assert (ref.argmax(1) == got.argmax(1)).all() and np.abs(ref - got).max() < 1e-4 * ref.std()
    export_onnx(q, tmp_path / "s.onnx", weight_dtype="int8")
    rt = open_runtime("openvino", tmp_path / "s.onnx", threads=1)
    assert rt.integer_ops().get("Convolution(u8)") == 4 and not any(k.startswith("Convolution") for k in rt.float_ops())
    if not cpu_has_int8_dot():
        pytest.skip("int8 weights run inexactly in OpenVINO on x86 CPUs without VNNI (measured 0.035 x logit std)")
    got = rt(x.numpy())
    assert (ref.argmax(1) == got.argmax(1)).all() and np.abs(ref - got).max() < 0.02 * ref.std()


def test_a_disagreement_on_a_cpu_without_vnni_names_the_cause(tmp_path, monkeypatch):
    """The runtime's logits are made to disagree; the error then says why an int8 graph does on such a CPU."""
    import zsq.export.runtimes as R

    q = tiny_quantized("deploy", "w8a8")
    run_batches = R.run_batches
    monkeypatch.setattr(R, "run_batches", lambda rt, x, b: -run_batches(rt, x, b))
    x = tiny_images(8, seed=4)
    for dtype, hint in (("int8", True), ("portable", False)):
        export_onnx(q, tmp_path / f"{dtype}.onnx", weight_dtype=dtype)
        for vnni in (False, True):
            monkeypatch.setattr(R, "cpu_has_int8_dot", lambda v=vnni: v)
            with pytest.raises(ZsqError, match="disagrees") as e:
                check_parity(q, tmp_path / f"{dtype}.onnx", x, threads=1, floor=1.0)
            assert ("no VNNI" in str(e.value) and "--weight-dtype portable" in str(e.value)) == (hint and not vnni)
