"""Deploy-preset models run in integer kernels: onnxruntime's optimized graph fuses every conv."""
from collections import Counter

import onnx
import onnxruntime as ort
import torch

from tests.tiny_models import tiny_images, tiny_quantized
from zsq.export import load_quantized, save_quantized
from zsq.export.onnx import export_onnx
from zsq.export.parity import check_parity


def _optimized_ops(path, tmp_path) -> Counter:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def test_deploy_w8a8_fuses_to_integer_convs_and_agrees(tmp_path):
    q = tiny_quantized("deploy", "w8a8")
    export_onnx(q, tmp_path / "m.onnx")
    ops = _optimized_ops(tmp_path / "m.onnx", tmp_path)
    assert ops["QLinearConv"] == 4 and ops["Conv"] == 0, ops
    assert ops["QLinearAdd"] == 1, ops  # the residual add runs in integers too
    res = check_parity(q, tmp_path / "m.onnx", tiny_images(64, seed=4), threads=1)
    assert res["top1_agreement"] == 1.0 and res["max_rel_logit_diff"] < 0.02


def test_paper_preset_does_not_fuse(tmp_path):
    """Why the deploy preset exists: the genie preset's graph keeps float convolutions."""
    q = tiny_quantized("genie", "w8a8")
    export_onnx(q, tmp_path / "m.onnx")
    ops = _optimized_ops(tmp_path / "m.onnx", tmp_path)
    assert ops["Conv"] + ops.get("FusedConv", 0) >= 3 and ops["QLinearConv"] == 0, ops


def test_deploy_checkpoint_round_trip_is_bit_identical(tmp_path):
    q = tiny_quantized("deploy", "w8a8")
    from tests.tiny_models import tiny_factory

    save_quantized(q, tmp_path / "ck", model_name="tiny_resnet")
    q2 = load_quantized(tmp_path / "ck", model_factory=lambda name: tiny_factory(seed=5))
    x = tiny_images(8, seed=9)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert q2.zsq_quant_plan["folded_outputs"] == ["block.bn2"]


def test_cli_export_checks_both_runtimes_against_the_float_floor(tmp_path, monkeypatch):
    import pytest

    from tests.export.test_onnx import _cli_args
    from tests.tiny_models import tiny_factory
    from zsq.errors import ZsqError
    from zsq.export import packed_checkpoint as ckpt_mod
    from zsq.cli import export as export_cli

    pytest.importorskip("openvino")
    monkeypatch.setattr(ckpt_mod, "_build_model", lambda name, factory: tiny_factory(seed=9))
    save_quantized(tiny_quantized("deploy", "w8a8"), tmp_path / "ck", model_name="tiny_resnet")
    res = export_cli.run(_cli_args(ckpt=str(tmp_path / "ck"), onnx=str(tmp_path / "m.onnx"),
                                   extra=["--runtime", "all", "--latency-runs", "2", "--threads", "1"]))
    assert res["preset"] == "deploy" and res["opset"] == 21
    assert 0.9 <= res["float_floor"] <= 1.0
    tol = res["tolerance"]  # the floor's rate plus 1 point, with the binomial spread of n images (p < 0.001)
    assert tol["min_agreement"] == pytest.approx(1 - tol["max_disagreements"] / res["n"])
    assert tol["min_agreement"] <= res["float_floor"] - 0.002 and tol["alpha"] == 0.001
    ort_res, ov_res = res["runtimes"]["ort"], res["runtimes"]["openvino"]
    # portable weights (uint8): onnxruntime fuses every conv; OpenVINO runs them in float, and says so
    assert res["weight_dtype"] == "portable" and ort_res["integer_ops"]["QLinearConv"] == 4
    assert "Convolution(u8)" not in ov_res["integer_ops"] and len(ov_res["float_layers"]) == 4
    for r in (ort_res, ov_res):
        assert r["top1_agreement"] >= res["tolerance"]["min_agreement"]
        assert set(r["latency_ms"]) == {"batch1", "batch32"} and all(v > 0 for v in r["latency_ms"].values())
    # int8 weights (loose bar: on a CPU without VNNI onnxruntime disagrees, as the warning says)
    res8 = export_cli.run(_cli_args(ckpt=str(tmp_path / "ck"), onnx=str(tmp_path / "s.onnx"),
                                    extra=["--weight-dtype", "int8", "--runtime", "openvino", "--latency-runs", "0",
                                           "--min-agreement", "0", "--max-rel-logit-diff", "100"]))
    assert res8["weight_dtype"] == "int8" and res8["runtimes"]["openvino"]["integer_ops"]["Convolution(u8)"] == 4
    with pytest.raises(ZsqError, match="opsets 13-21"):
        export_cli.run(_cli_args(ckpt=str(tmp_path / "ck"), onnx=str(tmp_path / "n.onnx"), extra=["--opset", "9"]))
    assert not (tmp_path / "n.onnx").exists()


def test_fold_keeps_the_codes_and_lets_more_layers_fuse(tmp_path):
    import numpy as np

    from tests.tiny_models import tiny_factory
    from zsq.export.fold import fold_quantized_batchnorm
    from zsq.export.runtimes import open_runtime, run_batches
    from zsq.export.weight_grid import weight_grid
    from zsq.quant import calibrate, get_preset, quantize_model
    from dataclasses import replace

    fp = tiny_factory()
    with torch.no_grad():  # negative BN scales: the folded grid must mirror those channels' codes
        fp.block.bn1.weight[:3] *= -1
    cfg = get_preset("genie", "w8a8")
    cfg = replace(cfg, weight=replace(cfg.weight, lp_ratios=20), act=replace(cfg.act, lp_ratios=20))
    q = quantize_model(fp, cfg)
    calibrate(q, tiny_images(32, seed=7), batch_size=16)
    x = tiny_images(64, seed=3)
    folded, pairs = fold_quantized_batchnorm(q, x[:4])
    assert pairs == [["conv1", "bn1"], ["block.conv1", "block.bn1"], ["block.conv2", "block.bn2"]]
    g0, g1 = weight_grid("block.conv1", q.block.conv1), weight_grid("block.conv1", folded.block.conv1)
    mirrored = g0.qmin + g0.qmax - g0.codes
    assert torch.equal(g1.codes[3:], g0.codes[3:]) and torch.equal(g1.codes[:3], mirrored[:3])
    with torch.no_grad():
        ref, got = q(x), folded(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    export_onnx(q, tmp_path / "plain.onnx")
    export_onnx(folded, tmp_path / "folded.onnx")
    plain_rt, rt = open_runtime("ort", tmp_path / "plain.onnx"), open_runtime("ort", tmp_path / "folded.onnx")
    assert plain_rt.integer_ops() == {} and rt.integer_ops() == {"QLinearConv": 1}  # block.conv1 -> ReLU -> Q
    # what stays float: the image-input conv, the conv feeding the residual add, the add, the
    # depthwise conv whose output only a pooling reads, the classifier
    assert [n.split(" ")[0] for n in rt.float_layers()] == ["conv1", "block/conv2", "block", "dw", "fc"]
    assert (run_batches(rt, x).argmax(1) == ref.numpy().argmax(1)).all()
    assert np.abs(run_batches(rt, x) - ref.numpy()).max() < 1e-3 * float(ref.std())


def test_cli_fold_reports_what_was_folded_and_what_stays_float(tmp_path, monkeypatch):
    from tests.export.test_onnx import _cli_args
    from tests.tiny_models import tiny_factory
    from zsq.export import packed_checkpoint as ckpt_mod
    from zsq.cli import export as export_cli

    monkeypatch.setattr(ckpt_mod, "_build_model", lambda name, factory: tiny_factory(seed=9))
    save_quantized(tiny_quantized("genie", "w8a8"), tmp_path / "ck", model_name="tiny_resnet")
    res = export_cli.run(_cli_args(ckpt=str(tmp_path / "ck"), onnx=str(tmp_path / "m.onnx"),
                                   extra=["--fold", "--latency-runs", "0", "--threads", "1"]))
    assert res["folded_bn"] == [["conv1", "bn1"], ["block.conv1", "block.bn1"], ["block.conv2", "block.bn2"]]
    ort_res = res["runtimes"]["ort"]
    assert ort_res["integer_ops"] == {"QLinearConv": 1} and "block/conv2 (Conv)" in ort_res["float_layers"]
    assert ort_res["top1_agreement"] >= res["tolerance"]["min_agreement"] and "latency_ms" not in ort_res
    assert "BatchNormalization" not in res["ops"]


def test_deploy_bias_is_exported_on_its_grid_and_matches_the_runtime_closer(tmp_path):
    """The .onnx holds each bias at its grid value (what onnxruntime quantizes to int32 exactly), and
    onnxruntime's integer kernels then track the fake-quant model more closely than without the grid."""
    from onnx import numpy_helper

    from zsq.quant.inventory import quant_layers

    q = tiny_quantized("deploy", "w8a8")
    export_onnx(q, tmp_path / "m.onnx", opset=17)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    biases = {n + ".bias": layer.quantized_bias().detach() for n, layer in quant_layers(q)}
    found = [n for n in biases if n in inits]
    assert len(found) >= 3, sorted(inits)
    for n in found:
        assert torch.equal(torch.tensor(inits[n]), biases[n]), n
    x = tiny_images(64, seed=4)
    with_grid = check_parity(q, tmp_path / "m.onnx", x, threads=1)
    for _, layer in quant_layers(q):
        layer.set_bias_grid(None)
    export_onnx(q, tmp_path / "plain.onnx", opset=17)
    without = check_parity(q, tmp_path / "plain.onnx", x, threads=1)
    assert with_grid["max_rel_logit_diff"] < without["max_rel_logit_diff"], (with_grid, without)


def test_timm_efficientnet_lite0_runs_in_integer_kernels(tmp_path):
    """timm's tf_efficientnet_lite0 (random init, no download): its BatchNormAct2d fold into the convs
    and the run-time TF-SAME pads of its Conv2dSame fold into them too, so every conv fuses."""
    import pytest

    timm = pytest.importorskip("timm", reason="timm is not installed")
    import zsq

    torch.manual_seed(0)
    m = timm.create_model("tf_efficientnet_lite0").eval()
    r = zsq.quantize(zsq.ModelSource(m, input_size=(3, 64, 64), mean=(0.485, 0.456, 0.406),
                                     std=(0.229, 0.224, 0.225)), method="bn-minmax", preset="deploy", bits="w8a8")
    plan = r.model.zsq_quant_plan
    assert len(plan["folded_bn"]) == 49 and plan["eager_fallback"] == [] and plan["kept_float"] == []
    info = export_onnx(r.model, tmp_path / "m.onnx")
    assert len(info["pads_folded_into_convs"]) == 5  # the stem and the four stride-2 depthwise convs
    assert not {"BatchNormalization", "Pad", "Shape", "Ceil"} & set(info["ops"]), info["ops"]
    ops = _optimized_ops(tmp_path / "m.onnx", tmp_path)
    assert ops["QLinearConv"] == 49 and ops["Conv"] == 0 and ops["FusedConv"] == 0, ops
    images = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    res = check_parity(r.model, tmp_path / "m.onnx", images, threads=1)
    assert res["top1_agreement"] == 1.0 and res["max_rel_logit_diff"] < 0.2, res
