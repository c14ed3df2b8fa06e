import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.errors import ZsqError
from zsq.methods.registry import QuantJob
from zsq.models.meta import ModelMeta, set_meta
from zsq.ptq.budgets import EngineOptions
from zsq.ptq.gptq import call_order, float_target, gptq_codes, gptq_round_layer, input_moments
from zsq.ptq.reconstruction_methods import genie
from zsq.quant import QuantSpec, UniformQuantizer, get_preset, quant_layers
from zsq.quant.quantizer import fake_quantize
from zsq.quant.modules import QuantConv2d, QuantLinear

W3 = QuantSpec(bits=3, symmetric=False, per_channel=True, observer="minmax")


def _on_grid(layer) -> bool:
    s, z = layer.weight_quant.qparams(layer.weight)
    codes = layer.weight / s + z
    return bool(torch.allclose(codes, codes.round(), atol=1e-4)) and \
        codes.round().min() >= layer.weight_quant.qmin and codes.round().max() <= layer.weight_quant.qmax


def _with_meta(model):
    return set_meta(model, ModelMeta("external", 10, (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))


def _correlated(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix


def test_gptq_lowers_a_linear_layers_output_error_below_nearest_and_stays_on_the_grid():
    g = torch.Generator().manual_seed(0)
    fp = nn.Linear(48, 24)
    with torch.no_grad():
        fp.weight.copy_(torch.randn(24, 48, generator=g) * 0.2)
    lin = QuantLinear.from_float(fp, W3, None)  # its grid fits the weight
    w = lin.weight.detach().clone()
    x = _correlated(1024, 48, 1)
    nearest = F.linear(x, lin.weight_quant(w))
    stats = gptq_round_layer("lin", lin, lambda: lin(x))
    assert _on_grid(lin)
    err_nearest = float(((x @ w.t() - nearest) ** 2).sum(1).mean())
    err_gptq = float(((x @ w.t() - x @ lin.weight.detach().t()) ** 2).sum(1).mean())
    assert err_gptq < 0.7 * err_nearest
    # the reported errors are these output errors (tr(D H D^T) with H the inputs' second moments)
    assert stats.nearest_error == pytest.approx(err_nearest, rel=1e-3)
    assert stats.gptq_error == pytest.approx(err_gptq, rel=1e-3)


@pytest.mark.parametrize("groups,stride,padding", [(1, 1, 1), (4, 2, 1), (8, 2, 0)])
def test_gptq_on_a_grouped_conv_reports_its_true_output_error(groups, stride, padding):
    """The per-group second moments come from unfolded patches: the error they give must equal the
    conv's own output error, per output position, for plain, grouped and depthwise convs."""
    g = torch.Generator().manual_seed(groups)
    conv = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, stride, padding, groups=groups, bias=False), W3, None)
    w = conv.weight.detach().clone()
    x = torch.randn(6, 8, 9, 9, generator=g)
    stats = gptq_round_layer("conv", conv, lambda: conv(x))
    assert _on_grid(conv)
    diff = F.conv2d(x, w - conv.weight.detach(), None, stride, padding, 1, groups)
    per_position = float((diff ** 2).sum(1).mean())
    assert stats.gptq_error == pytest.approx(per_position, rel=1e-3)
    assert stats.gptq_error < stats.nearest_error


def test_layers_are_rounded_in_the_order_the_forward_calls_them():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.second = nn.Linear(4, 4)
            self.first = nn.Linear(4, 4)

        def forward(self, x):
            return self.second(self.first(x))

    m = Reversed()
    order = call_order([("second", m.second), ("first", m.first)], lambda: m(torch.zeros(1, 4)))
    assert [n for n, _ in order] == ["first", "second"]
    with pytest.raises(ZsqError, match="second not called"):
        call_order([("second", m.second)], lambda: m.first(torch.zeros(1, 4)))


def test_genie_with_gptq_rounding_rounds_every_layer_and_trains_only_steps(tiny, tiny_images):
    job = QuantJob(calib=tiny_images, iters=4, batch_size=16, extra={"rounding": "gptq"})
    res = genie(tiny, get_preset("genie", "w4a4"), job)
    units = res.report["unit_losses"]
    assert all("gptq" in u and u["soft_loss"] is None for u in units)
    layer_stats = [s for u in units for s in u["gptq"]]
    assert len(layer_stats) == len(list(quant_layers(res.model)))
    assert sum(s["gptq_error"] for s in layer_stats) < sum(s["nearest_error"] for s in layer_stats)
    for _, layer in quant_layers(res.model):
        assert isinstance(layer.weight_quant, UniformQuantizer) and _on_grid(layer)
    out = res.model(tiny_images[:4])
    assert torch.isfinite(out).all()


def test_rounding_option_is_checked():
    with pytest.raises(ZsqError, match="rounding must be one of"):
        EngineOptions(rounding="nearest")
    job = QuantJob(calib=torch.randn(4, 3, 16, 16), iters=1, extra={"rounding": "obq"})
    from tests.tiny_models import make_tiny
    with pytest.raises(ZsqError, match="rounding"):
        genie(make_tiny(), get_preset("genie", "w4a4"), job)


def test_a_large_ridge_makes_gptq_round_to_nearest():
    """gptq_damp -> infinity: H is swamped by the ridge, no error is passed on, every weight rounds to nearest."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 5, 12, generator=g, dtype=torch.double)
    x = _correlated(256, 12, 4).double()
    h = (x.t() @ x / 256).expand(2, 12, 12)
    scale = w.abs().amax(2, keepdim=True) / 3.3  # no weight on a .5 tie
    zero = torch.full_like(scale, 4.0)
    nearest = fake_quantize(w, scale, zero, 0, 7)
    assert torch.equal(gptq_codes(w, h, scale, zero, 0, 7, damp=1e9), nearest)
    assert not torch.equal(gptq_codes(w, h, scale, zero, 0, 7), nearest)
    with pytest.raises(ZsqError, match="gptq_damp must be > 0"):
        EngineOptions(rounding="gptq", gptq_damp=0.0)


class SamePadConv(nn.Conv2d):
    """A hand-written TF "SAME" conv: pads (asymmetrically at stride 2) inside its own forward, as timm's
    Conv2dSame and TF-ported EfficientNets do."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("stride,groups", [(2, 1), (1, 4), (2, 8)])
def test_gptq_on_a_conv_that_pads_in_its_forward_equals_gptq_on_the_explicitly_padded_plain_conv(stride, groups):
    """The rows GPTQ fits come from what the kernel convolves (after the layer's own padding): the padded
    subclass fed x and a plain conv fed F.pad(x) must get the same codes and report the same errors."""
    from zsq.quant.modules import keep_forward_quant

    g = torch.Generator().manual_seed(stride + groups)
    fp = SamePadConv(8, 8, 3, stride, groups=groups, bias=True)
    with torch.no_grad():
        fp.weight.copy_(torch.randn(fp.weight.shape, generator=g) * 0.3)
        fp.bias.copy_(torch.randn(8, generator=g) * 0.1)
    x = _correlated(6 * 8 * 8, 8, 3).reshape(6, 8, 8, 8).permute(0, 3, 1, 2).contiguous()  # 8x8 at stride 2: pads 0/1
    padded_in = F.pad(x, (0, 1, 0, 1) if stride == 2 else (1, 1, 1, 1))
    plain_fp = nn.Conv2d(8, 8, 3, stride, 0, groups=groups, bias=True)
    plain_fp.load_state_dict(fp.state_dict())
    assert torch.allclose(fp(x), plain_fp(padded_in), atol=1e-6)  # the two are the same function
    padded = keep_forward_quant(copy.deepcopy(fp), W3, None)
    plain = QuantConv2d.from_float(plain_fp, W3, None)
    s_pad = gptq_round_layer("padded", padded, lambda: padded(x))
    s_plain = gptq_round_layer("plain", plain, lambda: plain(padded_in))
    assert torch.equal(padded.weight, plain.weight) and _on_grid(padded)
    assert not torch.equal(padded.weight, padded.weight_quant(fp.weight.detach()))  # GPTQ moved some codes
    assert s_pad.gptq_error == pytest.approx(s_plain.gptq_error, rel=1e-9)
    assert s_pad.gptq_error < s_pad.nearest_error
    # rows unfolded from the unpadded input would give another H: the padding matters to the result
    unpadded = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, stride, 1, groups=groups, bias=True), W3, None)
    unpadded.load_state_dict(plain.state_dict() | {"weight": fp.weight.detach()}, strict=False)
    gptq_round_layer("unpadded", unpadded, lambda: unpadded(x))
    if stride == 2:
        assert not torch.equal(unpadded.weight, plain.weight)


def test_a_conv_that_transforms_its_weight_or_its_output_is_refused():
    """What GPTQ truly cannot round: a weight changed inside forward (weight standardisation), or work after
    the kernel. Each is refused with the reason, never fitted to the wrong thing."""
    from zsq.quant.modules import keep_forward_quant

    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True))
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    class Doubles(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    x = torch.randn(2, 4, 8, 8)
    for cls, why in ((StdConv, "weight other than its own"), (Doubles, "more than a conv/linear")):
        conv = keep_forward_quant(cls(4, 4, 3, padding=1), W3, None)
        with pytest.raises(ZsqError, match=why):
            gptq_round_layer("c", conv, lambda: conv(x))


def test_gptq_on_a_torchvision_mobilenet_v2_lowers_every_layers_error():
    """A model zsq did not define: depthwise convs, torchvision's own blocks, a Linear head."""
    torchvision = pytest.importorskip("torchvision")
    fp = _with_meta(torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35).eval())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    res = genie(fp, get_preset("genie", "w4a8"), QuantJob(calib=x, iters=1, batch_size=8, extra={"rounding": "gptq"}))
    stats = [s for u in res.report["unit_losses"] for s in u["gptq"]]
    assert len(stats) == len(list(quant_layers(res.model))) == 53
    # GPTQ is greedy (and optimises H plus its ridge), so a layer may lose a little; the sum may not
    assert sum(s["gptq_error"] <= s["nearest_error"] * 1.0001 for s in stats) >= 0.9 * len(stats)
    assert sum(s["gptq_error"] for s in stats) < 0.9 * sum(s["nearest_error"] for s in stats)
    for _, layer in quant_layers(res.model):
        assert _on_grid(layer)


def test_tf_efficientnet_lite0_runs_genies_default_gptq_recipe_to_the_end(tmp_path, capsys):
    """`zsq quantize timm:tf_efficientnet_lite0 --random-init --method genie --bits w4a8` (issue 42): its
    Conv2dSame layers pad inside their forward, and the 224² quick budget's default GPTQ rounds every layer
    (a tiny budget: noise images, one step per unit)."""
    import json

    pytest.importorskip("timm", reason="timm (the optional 'timm' extra) is not installed")
    from zsq.cli import main

    out = tmp_path / "q"
    rc = main(["quantize", "timm:tf_efficientnet_lite0", "--random-init", "--method", "genie", "--bits", "w4a8",
               "--synth", "noise", "--num-images", "2", "--iters", "1", "--batch-size", "2", "--out", str(out),
               "--json", "--quiet"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)["method_report"]
    assert report["rounding"] == "gptq" and "gptq_fallback" not in report
    stats = [s for u in report["unit_losses"] for s in u.get("gptq", [])]
    assert len(stats) == 50  # every conv and the classifier, its 5 padded Conv2dSame included
    assert sum(s["gptq_error"] for s in stats) < sum(s["nearest_error"] for s in stats)
    assert (out / "manifest.json").exists()


def _twin_linears(seed):
    g = torch.Generator().manual_seed(seed)
    fp = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        fp.weight.copy_(torch.randn(16, 32, generator=g) * 0.2)
    x = _correlated(512, 32, seed)
    # the input as a quantized chain delivers it: a systematic distortion of x, plus noise
    distort = 0.85 * torch.eye(32) + 0.1 * torch.randn(32, 32, generator=g) / 32 ** 0.5
    xq = x @ distort + 0.02 * torch.randn(x.shape, generator=g)
    return fp, QuantLinear.from_float(fp, W3, None), x, xq


def test_the_float_target_corrects_the_error_the_quantized_input_carries():
    fp, q_float, x, xq = _twin_linears(5)
    _, q_plain, _, _ = _twin_linears(5)

    def both():
        fp(x)
        q_float(xq)

    s_float = gptq_round_layer("float", q_float, both, fp_layer=fp)
    gptq_round_layer("plain", q_plain, lambda: q_plain(xq))
    target = x @ fp.weight.detach().t()
    err = {k: float(((target - xq @ m.weight.detach().t()) ** 2).sum(1).mean()) for k, m in
           (("float", q_float), ("plain", q_plain))}
    assert err["float"] < 0.8 * err["plain"]
    assert s_float.gptq_error == pytest.approx(err["float"], rel=1e-3)
    assert _on_grid(q_float)


def test_the_float_targets_ridge_pulls_toward_the_float_weights():
    fp, q, x, xq = _twin_linears(6)
    m = input_moments(q, lambda: (fp(x[:8]), q(xq[:8])), fp_layer=fp)  # 8 rows for 32 columns
    w = fp.weight.detach().double()[None]
    assert torch.allclose(float_target(w, m, 1e9), w, atol=1e-6)
    assert not torch.allclose(float_target(w, m, 0.01), w, atol=1e-2)
    with pytest.raises(ZsqError, match="float twin did not see the same chunk"):
        input_moments(q, lambda: q(xq[:8]), fp_layer=fp)


def test_a_channel_no_calibration_image_reaches_rounds_to_nearest_and_is_not_zeroed():
    """ReLU channels dead on a few synthetic images may live on real ones: their weights must survive."""
    g = torch.Generator().manual_seed(7)
    fp = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    q = QuantConv2d.from_float(fp, W3, None)
    x = torch.randn(4, 4, 6, 6, generator=g)
    x[:, 2] = 0.0  # channel 2 is dead on these images
    xq = x + 0.05 * torch.randn(x.shape, generator=g)
    xq[:, 2] = 0.0

    def both():
        fp(x)
        q(xq)

    nearest = q.weight_quant(q.weight.detach().clone())
    gptq_round_layer("dw", q, both, fp_layer=fp)
    assert torch.equal(q.weight[2].detach(), nearest[2].detach()) and nearest[2].abs().sum() > 0
    assert torch.isfinite(q.weight).all()


def test_a_layer_called_twice_pairs_each_call_with_its_float_twins_call():
    """Shared weights (one layer used twice in a forward): the float rows must pair call by call."""
    fp, q, x, xq = _twin_linears(8)

    def twice(m, t):
        return m(m(t)[:, :16].repeat(1, 2))

    m = input_moments(q, lambda: (twice(fp, x), twice(q, xq)), fp_layer=fp)
    with torch.no_grad():
        second_fp, second_q = fp(x)[:, :16].repeat(1, 2), q(xq)[:, :16].repeat(1, 2)
    want = (x.double().t() @ xq.double() + second_fp.double().t() @ second_q.double()) / (2 * len(x))
    assert torch.allclose(m.c[0], want, rtol=1e-6, atol=1e-9)
    with pytest.raises(ZsqError, match="called more often"):
        input_moments(q, lambda: (twice(fp, x), q(xq)), fp_layer=fp)


class _StdConv(nn.Conv2d):
    """Weight standardisation inside forward (timm's StdConv2d does this): not a conv of its own weight."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def _std_conv_net():
    torch.manual_seed(0)  # a test's own model; the library never seeds
    return nn.Sequential(_StdConv(3, 8, 3, padding=1), nn.ReLU(), SamePadConv(8, 8, 3, 2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def _source(net, side):
    from zsq.run import ModelSource

    return ModelSource(net, input_size=(3, side, side), mean=(0.5,) * 3, std=(0.25,) * 3)


def _tiny():
    from zsq.run import Calibration, RunBudget

    return {"calibration": Calibration(synth="noise", num_images=2), "budget": RunBudget("quick", iters=1, batch_size=2)}


_TINY = _tiny()


def test_a_default_gptq_that_cannot_apply_falls_back_before_synthesis(caplog):
    """At 96² (the large quick budget) Genie-M W4A8 rounds with GPTQ by default; a layer GPTQ cannot round
    makes the run say so and use learned soft bits hardened to nearest, decided before the images are made."""
    import logging

    from zsq.api import quantize

    with caplog.at_level(logging.INFO, logger="zsq"):
        res = quantize(_source(_std_conv_net(), 96), method="genie", bits="w4a8", **_TINY)
    mr = res.report["method_report"]
    assert mr["rounding"] == "learned" and mr["hardening"] == "nearest"
    assert mr["gptq_fallback"].startswith("GPTQ cannot round 1 layer(s), e.g. 0: ")
    assert "0 (Quant_StdConv) convolves a weight other than its own" in mr["gptq_fallback"]
    messages = [r.getMessage() for r in caplog.records]
    warned = next(i for i, m in enumerate(messages) if "GPTQ cannot round" in m)
    synth = next(i for i, m in enumerate(messages) if "synthesizing calibration images" in m)
    assert warned < synth


def test_an_explicit_gptq_that_cannot_apply_is_refused_before_anything_is_written(tmp_path):
    from zsq.api import quantize

    out = tmp_path / "run"
    with pytest.raises(ZsqError, match=r"rounding=gptq: GPTQ cannot round 1 layer\(s\), e.g. 0: .*weight other"):
        quantize(_source(_std_conv_net(), 32), method="genie", bits="w4a8", out=out, options={"rounding": "gptq"},
                 **_TINY)
    assert not out.exists()


def test_the_padded_subclass_keeps_the_default_gptq_recipe():
    """SAME padding in forward is no reason to fall back: the 96² default rounds it with GPTQ."""
    from zsq.api import quantize

    net = nn.Sequential(SamePadConv(3, 8, 3, 2), nn.ReLU(), SamePadConv(8, 8, 3, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    res = quantize(_source(net, 96), method="genie", bits="w4a8", **_TINY)
    mr = res.report["method_report"]
    assert mr["rounding"] == "gptq" and "gptq_fallback" not in mr
    stats = [s for u in mr["unit_losses"] for s in u.get("gptq", [])]
    assert len(stats) == 3
