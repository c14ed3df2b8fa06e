"""DFQ's transform: CLE keeps the float function (ReLU, ReLU6, depthwise), equalizes the ranges, finds its
pairs from the graph on foreign models; HBA and the analytic bias correction do what their maths says."""
import pytest
import torch
import torch.nn as nn

import zsq
from zsq.errors import ZsqError
from zsq.methods import QuantJob, get_method
from zsq.models.meta import ModelMeta, set_meta
from zsq.quant.equalize import clipped_normal_mean, correct_bias, prepare_data_free
from zsq.quant.modules import ChannelClippedReLU, FoldedBatchNorm

META = ModelMeta(name="chain", num_classes=10, input_size=(3, 12, 12), mean=(0.5,) * 3, std=(0.25,) * 3)


def _bn(c, g, shift=0.0):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) * 2 + 0.2)
        bn.bias.copy_(torch.randn(c, generator=g) + shift)
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


class Chain(nn.Module):
    """conv-BN-act-conv-BN-act-(depthwise-BN-act)-conv-pool-fc, with very unequal channel ranges."""

    def __init__(self, act, depthwise=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8, g, 1.0), act()
        self.c2, self.b2, self.a2 = nn.Conv2d(8, 16, 1, bias=False), _bn(16, g, 1.0), act()
        self.depthwise = depthwise
        if depthwise:
            self.dw, self.b3, self.a3 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), _bn(16, g), act()
        self.c3 = nn.Conv2d(16, 8, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    scale = torch.logspace(-1.5, 1.0, m.weight.shape[0])[torch.randperm(m.weight.shape[0], generator=g)]
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * scale.reshape(-1, 1, 1, 1))

    def forward(self, x):
        x = self.a2(self.b2(self.c2(self.a1(self.b1(self.c1(x))))))
        if self.depthwise:
            x = self.a3(self.b3(self.dw(x)))
        return self.fc(torch.flatten(self.pool(self.c3(x)), 1))


def _x(n=8, seed=1, scale=3.0):
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed)) * scale


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("act, depthwise", [(nn.ReLU, False), (nn.ReLU6, False), (nn.ReLU6, True), (nn.ReLU, True)])
def test_cle_keeps_the_float_function(act, depthwise):
    m = set_meta(Chain(act, depthwise).eval(), META)
    x = _x()
    with torch.no_grad():
        ref = m(x)
        if act is nn.ReLU6:  # the inputs drive the ReLU6 clip: CLE must keep it, not only the ReLU part
            assert (m.a1(m.b1(m.c1(x))) == 6).any()
        prep = prepare_data_free(m, absorb="none")
        out = prep.model(x)
    pairs = {(p["conv1"], p["conv2"]) for p in prep.equalized}
    want = {("c1", "c2"), ("c2", "dw"), ("dw", "c3")} if depthwise else {("c1", "c2"), ("c2", "c3")}
    assert pairs == want
    assert _rel(out, ref) < 1e-5
    moved = max(max(abs(p["scale_max"] - 1), abs(1 - p["scale_min"])) for p in prep.equalized)
    assert moved > 0.5  # something was equalized, so the preservation above is not vacuous
    eq = prep.model
    # after convergence each pair's ranges match: max|W1[c]| == max|W2[:, c]|
    for a, b in (("c1", "c2"),) + ((("dw", "c3"),) if depthwise else (("c2", "c3"),)):
        w1, w2 = eq.get_submodule(a).weight.abs(), eq.get_submodule(b).weight.abs()
        r1 = w1.reshape(w1.shape[0], -1).amax(1)
        r2 = w2.transpose(0, 1).reshape(w2.shape[1], -1).amax(1)
        assert torch.allclose(r1, r2, rtol=1e-4)
    if act is nn.ReLU6:
        assert isinstance(eq.a1, ChannelClippedReLU) and not torch.allclose(eq.a1.cap, torch.full_like(eq.a1.cap, 6.0))
    assert torch.equal(eq.fc.weight, m.fc.weight)  # outside every pair: untouched
    assert isinstance(m.b1, nn.BatchNorm2d) and isinstance(m.a1, act)  # the float model itself is not changed


def test_relu6_modes():
    m = set_meta(Chain(nn.ReLU6).eval(), META)
    skip = prepare_data_free(m, relu6="skip", absorb="none")
    assert skip.equalized == []  # both pairs have a ReLU6 between them
    assert len([s for s in skip.skipped if "ReLU6" in s["why"]]) == 2
    assert type(skip.model.a1) is nn.ReLU6
    relu = prepare_data_free(m, relu6="relu", absorb="none")
    assert type(relu.model.a1) is nn.ReLU


def test_high_bias_absorption_is_exact_without_activation_and_updates_the_bn_statistics():
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), _bn(6, g, 3.0), nn.Conv2d(6, 4, 1),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    m = set_meta(m.eval(), META)
    x = _x()
    with torch.no_grad():
        ref = m(x)
        prep = prepare_data_free(m, absorb="unpadded")
        assert _rel(prep.model(x), ref) < 1e-5
    assert [a["conv1"] for a in prep.absorbed] == ["0"]
    bn = prep.model.get_submodule("1")
    assert isinstance(bn, FoldedBatchNorm) and torch.allclose(bn.bias, torch.zeros(6), atol=1e-5)  # beta moved on


def test_high_bias_absorption_through_relu_is_exact_where_preactivations_stay_above_c():
    m = set_meta(Chain(nn.ReLU).eval(), META)
    prep = prepare_data_free(m, absorb="all")
    plain = prepare_data_free(m, absorb="none")
    assert prep.absorbed and all(a["max"] > 0 for a in prep.absorbed)
    p, q = plain.model, prep.model
    c1 = p.b1.bias - q.b1.bias  # what moved out of c1's channels (the BN statistics follow the bias)
    assert (c1 >= 0).all() and torch.allclose(c1, torch.clamp(p.b1.bias - 3 * p.b1.weight.abs(), min=0))
    assert torch.allclose(q.c1.bias, p.c1.bias - c1)
    x = _x(4, 2, 0.0)  # a zero image: c1's pre-activation is its bias everywhere (padding adds zeros)
    with torch.no_grad():
        z1 = p.c1(x)
        assert ((z1 >= c1.reshape(1, -1, 1, 1)) | (c1.reshape(1, -1, 1, 1) == 0)).all()  # where HBA is exact
        c2 = (p.b2.bias - q.b2.bias).reshape(1, -1, 1, 1)
        # c2's output is the same, less what the next absorption moved out of it
        assert _rel(q.c2(q.a1(q.c1(x))) + c2, p.c2(p.a1(p.c1(x)))) < 1e-5


def test_clipped_normal_mean_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    beta, gamma = torch.tensor([-1.0, 0.3, 2.0, 5.0]), torch.tensor([1.0, 2.0, -1.5, 2.0])  # a negative gamma: |gamma|
    z = beta[:, None] + gamma.abs()[:, None] * torch.randn(4, 1_000_000, generator=g)
    for cap, ref in ((None, z.mean(1)), (torch.tensor([float("inf")]), z.clamp(min=0).mean(1)),
                     (torch.tensor([6.0]), z.clamp(0, 6).mean(1)), (torch.tensor([1.0, 2.0, 3.0, 4.0]),
                                                                    torch.minimum(z.clamp(min=0), torch.tensor([[1.0], [2.0], [3.0], [4.0]])).mean(1))):
        assert torch.allclose(clipped_normal_mean(beta, gamma, cap).float(), ref, atol=3e-3)


def test_bias_correction_cancels_the_predicted_shift_and_does_nothing_on_exact_weights():
    m = set_meta(Chain(nn.ReLU6, depthwise=True).eval(), META)
    prep = prepare_data_free(m, equalize=False)
    q = zsq.quantize_model(prep.model, zsq.get_preset("gdfq", "w4a4"))
    biases = {n: mod.bias.detach().clone() for n, mod in q.named_modules() if hasattr(mod, "weight_quant") and mod.bias is not None}
    rep = correct_bias(q, prep)
    assert {c["layer"] for c in rep["corrected"]} == {"c2", "dw", "c3"}  # c1 reads the image, fc a pooling
    for name in ("c2", "dw", "c3"):
        layer = q.get_submodule(name)
        st = prep.input_stats[name]
        bn = prep.model.get_submodule(st.bn)
        mean = clipped_normal_mean(bn.bias, bn.weight, st.cap).float()
        w = layer.weight
        eps = (layer.quantized_weight() - w).reshape(w.shape[0], w.shape[1], -1).sum(2)
        shift = eps[:, 0] * mean if layer.groups > 1 else eps @ mean
        assert torch.allclose(layer.bias - biases[name], -shift, atol=1e-5)
    q8 = zsq.quantize_model(prep.model, zsq.get_preset("gdfq", "w8a8"))
    for _, mod in q8.named_modules():
        if getattr(mod, "weight_quant", None) is not None:
            mod.weight_quant.enabled = False  # W_hat = W: nothing to correct
    before = {n: mod.bias.detach().clone() for n, mod in q8.named_modules() if getattr(mod, "bias", None) is not None}
    correct_bias(q8, prep)
    assert all(torch.equal(before[n], q8.get_submodule(n).bias) for n in before)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_torchvision_models_run_through_dfq(arch):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)  # torchvision's init draws the global RNG; this test owns it
    m = getattr(tv.models, arch)(num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.3)
                bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
    m = set_meta(m, ModelMeta(name=arch, num_classes=10, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3))
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = m(x)
        prep = prepare_data_free(m, absorb="none")
        assert _rel(prep.model(x), ref) < 1e-4
    kinds = {p["kind"] for p in prep.equalized}
    if arch == "mobilenet_v2":  # expand -> dw and dw -> project in every inverted residual
        assert "depthwise" in kinds and len(prep.equalized) >= 30
    else:  # conv1 -> relu -> conv2 in each BasicBlock (the ReLU module is shared with the block output: stateless)
        assert len(prep.equalized) == 8
    res = get_method("dfq").fn(m, zsq.get_preset("gdfq", "w8a8"), QuantJob())  # min/max grids: fast
    assert res.report["dfq"]["equalized_pairs"] and res.report["bias_correction"]["corrected"]
    with torch.no_grad():
        assert torch.isfinite(res.model(x)).all()


def test_dfq_refuses_a_model_without_batchnorm():
    m = set_meta(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten(), nn.Linear(4, 10)).eval(), META)
    for method, extra in (("dfq", {}), ("bn-minmax", {"equalize": True})):
        with pytest.raises(ZsqError, match="needs BatchNorm") as e:
            get_method(method).fn(m, zsq.get_preset("genie", "w8a8"), QuantJob(extra=extra))
        assert "\n" not in str(e.value)
