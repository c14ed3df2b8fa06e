"""The deploy preset: BN folding is exact, quantizers sit where integer kernels need them, every
method runs on it."""
import copy

import pytest
import torch
import torch.nn as nn

from tests.tiny_models import tiny_factory, tiny_images
from zsq.methods import get_method
from zsq.methods.registry import QuantJob
from zsq.quant import calibrate_from_bn, get_preset, quantize_model
from zsq.quant.modules import FoldedBatchNorm, QuantAct
from zsq.quant.state import set_quant_state
from zsq.quant.transforms import fold_batchnorm
from zsq.quant.inventory import act_quantizers, quant_layers


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_folding_is_exact_in_float():
    model = tiny_factory()
    x = tiny_images(8)
    folded = copy.deepcopy(model)
    pairs = fold_batchnorm(folded, x)
    assert [p[1] for p in pairs] == ["bn1", "block.bn1", "block.bn2"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        ref, got = model(x), folded(x)
    assert not torch.equal(ref, model.fc(torch.zeros(8, 8)))  # the BNs matter for this model
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the deploy model with quantization switched off is the float model too
    q = quantize_model(model, get_preset("deploy", "w8a8"))
    set_quant_state(q, weights=False, acts=False)
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


def test_deploy_places_each_tensor_once():
    q = quantize_model(tiny_factory(), get_preset("deploy", "w8a8"))
    plan = q.zsq_quant_plan
    assert plan["config"]["preset"] == "deploy" and plan["config"]["fold_bn"]
    # conv2's output goes to the residual add: quantized at its folded BN's slot
    assert plan["folded_outputs"] == ["block.bn2"]
    assert isinstance(q.block.bn2, QuantAct) and isinstance(q.block.bn2.act, FoldedBatchNorm)
    assert plan["after_activation"] == ["relu", "block.relu1", "block.relu2", "relu6"]
    # inputs that are ReLU outputs already need no second quantizer; the image and the pooled
    # features do
    assert plan["inputs_already_quantized"] == ["block.conv1", "block.conv2", "block.shortcut", "dw"]
    assert q.conv1.input_quant is not None and q.fc.input_quant is not None
    assert q.block.conv1.input_quant is None and isinstance(q.block.shortcut, nn.Identity)
    for _, layer in quant_layers(q):
        assert layer.weight_quant.spec.symmetric and layer.weight_quant.qmin == -128
    for _, aq in act_quantizers(q):
        assert not aq.spec.symmetric and aq.bits == 8


def test_bn_minmax_works_on_folded_bn_and_keeps_relu_zero_points_at_zero():
    q = quantize_model(tiny_factory(), get_preset("deploy", "w8a8"))
    calibrate_from_bn(q)
    for name, aq in act_quantizers(q):
        scale, zp = (t.detach() for t in aq.qparams(None))
        assert bool(aq.initialized) and float(scale) > 0
        if "relu" in name:  # after a ReLU the runtime may drop the ReLU only with zero point 0
            assert float(zp) == 0.0, name
    # the conv2 output (pre-add) range comes from the folded BN's affine: about min(beta - 4 gamma)
    scale, zp = (t.detach() for t in q.block.bn2.quant.qparams(None))
    bn = tiny_factory().block.bn2
    expected = float((bn.bias - 4 * bn.weight).detach().min())
    assert abs(float(-zp * scale) - expected) < 0.1 * abs(expected)


@pytest.mark.parametrize("method", ["bn-minmax", "minmax", "genie", "brecq", "qdrop", "adaround", "ait", "hast",
                                    "gdfq"])
def test_every_method_runs_on_the_deploy_preset(method):
    model = tiny_factory()
    images = tiny_images(16, seed=3)
    info = get_method(method)
    job = QuantJob(calib=images if info.needs_images or method == "ait" else None, calib_source="test",
                   iters=4, batch_size=8, epochs=1, iters_per_epoch=1)
    res = info.fn(model, get_preset("deploy", "w8a8"), job)
    q = res.model
    assert q.zsq_quant_config.preset == "deploy"
    assert all(isinstance(layer.bias, torch.Tensor) for _, layer in quant_layers(q)[:-1])  # BN folded into biases
    with torch.no_grad():
        out = q(tiny_images(4))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert all(bool(aq.initialized) for _, aq in act_quantizers(q))


def _input_step(layer):
    return layer.__dict__["_bias_input_quant"].qparams()[0].reshape(())


def test_deploy_biases_lie_on_the_int32_kernel_grid():
    """deploy v2 adds each bias as QLinearConv does: rounded to the grid input step x weight step,
    the input step being that of the quantizer the input lies on (its own, or the ReLU's upstream)."""
    from dataclasses import replace

    from zsq.quant.modules import weight_step

    model = tiny_factory()
    x = tiny_images(16)
    q = get_method("bn-minmax").fn(model, get_preset("deploy", "w8a8"), QuantJob()).model
    assert q.zsq_quant_plan["config"]["bias_grid"] and q.zsq_quant_plan["config"]["version"] >= 2
    assert q.block.conv1.__dict__["_bias_input_quant"] is q.relu.quant  # input quantizer dropped: upstream grid
    assert q.conv1.__dict__["_bias_input_quant"] is q.conv1.input_quant
    moved = 0
    for name, layer in quant_layers(q):
        b, qb = layer.bias.detach(), layer.quantized_bias().detach()
        step = _input_step(layer) * weight_step(layer.weight_quant, layer.weight).reshape(-1)
        codes = qb / step
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3, msg=name)
        assert torch.all((qb - b).abs() <= step / 2 * (1 + 1e-5)), name
        moved += int(not torch.equal(qb, b))
    assert moved >= 3  # the rounding is real: most biases move
    # the same calibrated model without the grid computes something else, and v1 (no grid) is still expressible
    plain = copy.deepcopy(q)
    for _, layer in quant_layers(plain):
        layer.set_bias_grid(None)
    with torch.no_grad():
        assert not torch.equal(plain(x), q(x))
    assert not replace(get_preset("deploy", "w8a8"), bias_grid=False).bias_grid
    # quantizers off: the float bias, so the float model comes back exactly
    set_quant_state(q, weights=False, acts=False)
    assert all(torch.equal(layer.quantized_bias(), layer.bias) for _, layer in quant_layers(q))


def test_image_input_range_is_pinned_to_the_valid_pixel_range():
    """Calibrated on images narrower than real ones (synthetic), the image quantizer would clip real
    images; deploy pins it to [min (0-mean)/std, max (1-mean)/std] and nothing moves it after."""
    from zsq.methods.registry import QuantJob
    from zsq.models.meta import get_meta
    from zsq.quant import calibrate

    model = tiny_factory()
    lo, hi = get_meta(model).input_range()
    m, s = get_meta(model).mean, get_meta(model).std
    assert lo == min((0 - a) / b for a, b in zip(m, s)) and hi == max((1 - a) / b for a, b in zip(m, s))
    q = quantize_model(model, get_preset("deploy", "w8a8"))
    assert q.zsq_quant_plan["pinned_input_ranges"] == ["conv1.input_quant"]
    iq = q.conv1.input_quant
    pinned = (iq.scale.detach().clone(), iq.zero_point.clone())
    torch.testing.assert_close(-iq.zero_point * iq.scale, torch.tensor(lo), atol=iq.scale.item(), rtol=0)
    torch.testing.assert_close((255 - iq.zero_point) * iq.scale, torch.tensor(hi), atol=iq.scale.item(), rtol=0)
    narrow = tiny_images(32) * 0.1  # far narrower than valid images
    calibrate(q, narrow, batch_size=16)
    assert torch.equal(iq.scale.detach(), pinned[0]) and torch.equal(iq.zero_point, pinned[1])
    assert all(bool(aq.initialized) for _, aq in act_quantizers(q))
    assert not torch.equal(q.block.bn2.quant.scale.detach(), pinned[0])  # the others did calibrate
    for method in ("bn-minmax", "genie"):
        job = QuantJob(calib=narrow, iters=3, batch_size=8)
        out = get_method(method).fn(model, get_preset("deploy", "w8a8"), job).model
        assert torch.equal(out.conv1.input_quant.scale.detach(), pinned[0]), method
    assert quantize_model(model, get_preset("genie", "w8a8")).zsq_quant_plan["pinned_input_ranges"] == []
