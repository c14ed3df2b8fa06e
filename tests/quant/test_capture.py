"""Graph capture: every model quantized faithfully, whatever its forward looks like (issue 13)."""
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import zsq.models
from zsq.errors import ZsqError
from zsq.models.meta import ModelMeta, set_meta
from zsq.hooks import Hooks
from zsq.quant import (QuantAct, QuantInput, act_quantizers, calibrate_from_bn, get_preset, quant_layers,
                       quantize_model)
from zsq.quant import graph as G
from zsq.quant.modules import QuantKeepForward
from zsq.quant.quantizer import UniformQuantizer
from zsq.quant.state import lazy_init_allowed, quantizers_disabled
from zsq.quant.transforms import check_rewrite


class PaddedConv(nn.Conv2d):
    """A user's TF-SAME-style conv: pads in forward, conv with padding=0 (like timm's Conv2dSame)."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class Hand(nn.Module):
    """Padded Conv2d subclass, functional ReLU, a ReLU module used twice, residual `out += x`."""

    def __init__(self):
        super().__init__()
        self.stem = PaddedConv(3, 8, 2, padding=0)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


class HandCat(nn.Module):
    """DenseNet-style: the block input is concatenated with what the block computed from it (`torch.cat`)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.trans, self.bn2 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.cat([x, F.relu(self.bn1(self.conv1(x)))], 1)
        x = F.relu(self.bn2(self.trans(x)))
        return self.fc(x.mean((2, 3)))


def _meta(m, size, classes=1000):
    set_meta(m.eval(), ModelMeta("m", classes, (3, size, size), (0.5,) * 3, (0.5,) * 3))
    return m


def _tv(name):
    tv = pytest.importorskip("torchvision")
    return lambda: _meta(getattr(tv.models, name)(weights=None), 64)


def _timm(name):
    def build():
        timm = pytest.importorskip("timm")
        return _meta(timm.create_model(name, pretrained=False), 64)
    return build


def _pytorchcv():
    pcv = pytest.importorskip("pytorchcv.model_provider")
    return _meta(pcv.get_model("resnet20_cifar10", pretrained=False), 32, 10)


MODELS = {
    "zsq:cifar10_resnet20": lambda: zsq.models.load("cifar10_resnet20"),
    "zsq:efficientnet_lite0": lambda: _meta(zsq.models.load("efficientnet_lite0"), 64),
    "torchvision:resnet18": _tv("resnet18"),
    "torchvision:resnet50": _tv("resnet50"),
    "torchvision:mobilenet_v2": _tv("mobilenet_v2"),
    "torchvision:mobilenet_v3_large": _tv("mobilenet_v3_large"),
    "torchvision:efficientnet_b0": _tv("efficientnet_b0"),
    "torchvision:regnet_x_400mf": _tv("regnet_x_400mf"),
    "timm:tf_efficientnet_lite0": _timm("tf_efficientnet_lite0"),
    "timm:mobilenetv3_large_100": _timm("mobilenetv3_large_100"),
    "timm:resnet18": _timm("resnet18"),
    "pytorchcv:resnet20_cifar10": _pytorchcv,
    "hand-written": lambda: _meta(Hand(), 16, 10),
    "hand-written-cat": lambda: _meta(HandCat(), 16, 10),
}
ACT_NAMES = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_"}
LAYER_NAMES = {"conv2d", "linear"}


class _Count(TorchFunctionMode):
    """Counts the activation and conv/linear calls a forward makes (module or functional)."""

    def __init__(self):
        super().__init__()
        self.acts = self.layers = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.acts += name in ACT_NAMES
        self.layers += name in LAYER_NAMES
        return func(*args, **(kwargs or {}))


def _calls(model, x):
    with torch.no_grad(), _Count() as c, lazy_init_allowed(model):  # a probe: uncalibrated ranges are fine
        model(x)
    return c


def _quantizer_calls(q, x):
    """How often each activation quantizer runs in one forward."""
    counts = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
             for n, m in act_quantizers(q)]
    try:
        with torch.no_grad(), lazy_init_allowed(q):  # a probe: uncalibrated ranges are fine
            q(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


def _merge_inputs_unquantized(q):
    """Inputs of add/cat merges that are neither quantized nor the output of a layer path: walking
    back through parameter-free ops they reach a fork or the block input with no quantizer."""
    bad = []
    cap = G.capture(q)
    for owner, graph in cap.graphs.items():
        omod = q.get_submodule(owner) if owner else q
        for node in graph.nodes:
            if not G.is_merge(node) or len(G.merge_inputs(node)) < 2:
                continue
            for i, inp in enumerate(G.merge_inputs(node)):
                cur, quantized = inp, False
                while True:
                    mod = G.module_of(omod, cur)
                    if isinstance(mod, (QuantInput, QuantAct, UniformQuantizer)):
                        quantized = True
                        break
                    if cur.op == "placeholder" or len(cur.users) >= 2 or (mod is not None and any(True for _ in mod.parameters())):
                        break
                    nxt = [a for a in cur.args if isinstance(a, torch.fx.Node)]
                    if len(nxt) != 1:
                        break
                    cur = nxt[0]
                s = G.skip_input(omod, node, i, inp)
                if s is not None and not quantized:
                    bad.append(f"{owner}:{node.name}[{i}]")
    return bad


def _cheap(cfg):
    """The preset's placement with min/max weight ranges (Lp search is slow on 25M weights)."""
    return dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, observer="minmax"))


def _settle_bn(m, x):
    """One train-mode pass so random-init BN statistics describe the data (bn-minmax reads them)."""
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.momentum = None
            bn.reset_running_stats()
    m.train()(x)
    return m.eval()


SLOW = {"torchvision:resnet50", "torchvision:efficientnet_b0", "torchvision:regnet_x_400mf",
        "torchvision:mobilenet_v3_large", "timm:mobilenetv3_large_100"}
# W8A8 closeness on random inputs (see w8a8_closeness): every model, the median over activation quantizers of
# each one's relative error on the float tensor it reads; the networks that barely amplify an error, the
# relative L2 error of the logits too, below W8A8_NOISE_RATIO x their 1 % noise floor and W8A8_BOUND
LOCAL_MEDIAN_BOUND = 0.05
W8A8_NOISE_RATIO = 5.0
W8A8_BOUND = {"zsq:cifar10_resnet20": 0.1, "torchvision:resnet18": 0.2, "timm:resnet18": 0.1,
              "pytorchcv:resnet20_cifar10": 0.15, "hand-written": 0.05, "hand-written-cat": 0.05}


def _noise_floor(m, x, ref, level=0.01, seed=0):
    """Relative logit error of the float model when the input of every conv/linear but the first gets
    Gaussian noise of ``level`` times that input's RMS: what the network itself makes of a small error."""
    gen = torch.Generator().manual_seed(seed)

    def add_noise(_mod, args):
        t = args[0]
        return (t + level * t.pow(2).mean().sqrt() * torch.randn(t.shape, generator=gen),) + tuple(args[1:])

    layers = [t for t in m.modules() if isinstance(t, (nn.Conv2d, nn.Linear))][1:]
    with Hooks() as hooks, torch.no_grad():
        for t in layers:
            hooks.pre(t, add_noise)
        return _rel(m(x), ref)


def _rel(y, ref):
    return ((y - ref).norm() / ref.norm()).item()


def settled_model(name):
    """(model with BN statistics from 16 random images, 8 random inputs, its float output), seeded."""
    torch.manual_seed(0)
    m = MODELS[name]()
    x = torch.randn(8, *m.zsq_meta.input_size)
    with torch.no_grad():
        _settle_bn(m, torch.randn(16, *m.zsq_meta.input_size))
        return m, x, m(x)


def w8a8_closeness(name, m, x, ref):
    """W8A8 (genie placement, bn-minmax ranges) against float on random inputs: {"err", "bound", "floor",
    "top1", "local_median", "local_max"} (also printed by ``benchmarks/any_cnn_closeness.py``).

    Random-init networks, even with BN statistics from data (``_settle_bn``), amplify any error layer by
    layer: 1 % noise at every layer input moves the logits of the mobile nets, ResNet-50 and RegNet by
    0.16-0.47 (ResNet-20: 0.015), and re-estimated BN statistics, smoother inputs, 128x128 inputs or shrunk
    residual branches do not change that (measured). On them the W8A8 logits are 0.4-0.9 away from float
    whatever the quantizer does, so no logit bound says anything there. What is bounded on every model is
    each activation quantizer against the tensor it reads: the median relative error is at most
    ``LOCAL_MEDIAN_BOUND`` (0.05; 8-bit rounding of a mean +- 4 std range is about 1 % of a tensor's std,
    up to 3.5 % on a post-ReLU tensor under genie's symmetric grid; measured 0.011-0.039), which a
    misplaced quantizer, one shared by tensors of different scale or systematically wrong ranges exceed.
    The networks that barely amplify (the ResNets, the hand-written ones) also bound the logits: relative
    L2 error at most ``W8A8_NOISE_RATIO`` (5) times that of 1 % noise at every layer input (measured
    0.6-4.3) and below ``W8A8_BOUND``. Top-1 agreement is reported, not asserted: random-init logits nearly
    tie, so the top class flips on errors far below any bound."""
    floor = _noise_floor(m, x, ref)
    q8 = calibrate_from_bn(quantize_model(m, _cheap(get_preset("genie", "w8a8"))))
    with torch.no_grad():
        out = q8(x)
    local = sorted(_local_errors(q8, x))
    return {"err": _rel(out, ref), "bound": min(W8A8_NOISE_RATIO * floor, W8A8_BOUND.get(name, float("inf"))),
            "floor": floor, "top1": (out.argmax(1) == ref.argmax(1)).float().mean().item(),
            "local_median": local[len(local) // 2], "local_max": local[-1]}


def _local_errors(q, x):
    """Each activation quantizer's relative error on the float tensor it reads (all quantizers off)."""
    seen = {}
    with Hooks() as hooks, quantizers_disabled(q), torch.no_grad():
        for n, t in act_quantizers(q):
            hooks.pre(t, lambda _m, a, n=n: seen.setdefault(n, a[0].clone()))
        q(x)
    with torch.no_grad():
        return [_rel(t(seen[n]), seen[n]) for n, t in act_quantizers(q) if n in seen]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_any_cnn_is_captured_faithfully(name):
    m, x, ref = settled_model(name)
    float_calls = _calls(m, x)
    n_layers = sum(isinstance(t, (nn.Conv2d, nn.Linear)) for t in m.modules())

    # genie: every conv/linear call is a quantized layer; every layer input but the image is quantized;
    # every residual skip input carries a quantizer
    g = quantize_model(m, _cheap(get_preset("genie", "w4a4")))
    layers = quant_layers(g)
    assert len(layers) == n_layers and _calls(g, x).layers == float_calls.layers
    assert [n for n, t in layers[1:] if t.input_quant is None] == []
    assert layers[0][1].input_quant is None
    assert _merge_inputs_unquantized(g) == []
    assert g.zsq_quant_plan["kept_float"] == [] and g.zsq_quant_plan["eager_fallback"] == []
    with quantizers_disabled(g), torch.no_grad():
        assert torch.equal(g(x), ref)

    # gdfq: one quantizer per activation call, each reading exactly one tensor
    d = quantize_model(m, _cheap(get_preset("gdfq", "w4a4")))
    counts = _quantizer_calls(d, x)
    assert len(counts) == len(act_quantizers(d)) == float_calls.acts
    assert set(counts.values()) <= {1}
    with quantizers_disabled(d), torch.no_grad():
        assert torch.equal(d(x), ref)

    got = w8a8_closeness(name, m, x, ref)
    assert got["local_median"] <= LOCAL_MEDIAN_BOUND, got
    if name in W8A8_BOUND:
        assert got["err"] <= got["bound"], got


EXPECTED_RESIDUALS = {  # skip-path quantizers: identity shortcuts only (projections are layers)
    "zsq:cifar10_resnet20": 9, "torchvision:resnet18": 5, "torchvision:mobilenet_v2": 10,
    "timm:tf_efficientnet_lite0": 9, "hand-written": 1, "hand-written-cat": 1,
}


@pytest.mark.parametrize("name", list(EXPECTED_RESIDUALS))
def test_genie_residual_quantizers_are_found_from_the_graph(name):
    q = quantize_model(MODELS[name](), _cheap(get_preset("genie", "w4a4")))
    assert len(q.zsq_quant_plan["residual"]) == EXPECTED_RESIDUALS[name]


def test_hand_written_model_keeps_padding_and_gets_a_quantizer_per_call_site():
    m = _meta(Hand(), 16, 10)
    q = quantize_model(m, get_preset("gdfq", "w4a4"))
    assert isinstance(q.stem, QuantKeepForward) and isinstance(q.stem, PaddedConv)  # forward kept
    assert q.stem.weight_quant.bits == 4
    sites = q.zsq_quant_plan["activation_sites"]
    assert len(sites) == 3  # F.relu, then self.relu twice: three quantizers, not two
    assert len({s["quantizer"] for s in sites}) == 3
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), lazy_init_allowed(q):  # ranges from this batch, on purpose
        y = q(x)  # enabled: quantized, still the float model's shape
    assert y.shape == (2, 10)


def test_the_check_names_the_first_layer_that_differs():
    m = _meta(Hand(), 16, 10)
    x = torch.randn(2, 3, 16, 16)
    q = quantize_model(m, get_preset("genie", "w4a4"), example_input=x)
    with torch.no_grad():
        expected = m(x)
        q.conv2.bias = nn.Parameter(torch.full((8,), 1e-3))  # a rewrite that changed the function
    with pytest.raises(ZsqError, match=r"first difference at conv2 \(Conv2d\)"):
        check_rewrite(m, q, expected, x, fold=False)


class Branchy(nn.Module):
    """Data-dependent control flow fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > -1e9:
            y = y + self.shortcut(x[:, :1].expand(-1, 4, -1, -1))
        return self.relu(y)


def test_untraceable_module_falls_back_and_says_so(caplog):
    m = _meta(nn.Sequential(Branchy(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)), 8, 3)
    with caplog.at_level("INFO", logger="zsq"):
        q = quantize_model(m, get_preset("gdfq", "w4a4"))
    fb = q.zsq_quant_plan["eager_fallback"]
    assert [f["module"] for f in fb] == ["0"] and "control flow" in fb[0]["why"]
    assert any("eager fallback for 0 (Branchy)" in r.getMessage() for r in caplog.records)
    assert isinstance(q[0].relu, QuantAct)  # module rule inside it


class BranchyNet(nn.Module):
    """A whole model fx cannot trace (data-dependent control flow at the top)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        if y.sum() > -1e9:
            y = y + x[:, :1]
        return self.fc(y.mean((2, 3)))


def test_an_untraceable_model_is_named_in_the_report_and_logged(caplog):
    import logging

    import zsq

    caplog.set_level(logging.WARNING, logger="zsq")

    meta = dict(input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    kw = dict(method="bn-minmax", bits="w8a8")
    res = zsq.quantize(zsq.ModelSource(BranchyNet(), **meta), **kw)
    assert res.report["capture"] == "fx, eager fallback in parts" and res.report["eager_fallback"] == [""]
    assert "eager fallback for the model (BranchyNet): fx could not trace it" in caplog.text
    caplog.clear()
    assert [n for n, _ in quant_layers(res.model)] == ["conv", "fc"]  # module rules still quantize its layers
    res = zsq.quantize(zsq.ModelSource(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), Branchy(), nn.Flatten(),
                                                     nn.Linear(4 * 8 * 8, 3)), **meta), **kw)
    assert res.report["eager_fallback"] == ["2"]
    assert "eager fallback for 2 (Branchy)" in caplog.text


def test_layers_without_a_quantized_form_stay_float_or_fail_strict():
    m = _meta(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2), nn.Flatten(), nn.LazyLinear(2)), 8, 2)
    m(torch.randn(1, 3, 8, 8))
    q = quantize_model(m, get_preset("genie", "w8a8"))
    assert q.zsq_quant_plan["kept_float"][0]["layer"] == "1"
    assert type(q[1]) is nn.ConvTranspose2d
    with pytest.raises(ZsqError, match=r"--strict: layer 1 \(ConvTranspose2d\)"):
        quantize_model(m, get_preset("genie", "w8a8"), strict=True)


def test_quantize_model_without_an_example_input_says_what_to_give():
    m = Hand().eval()
    with pytest.raises(ZsqError, match="example_input="):
        quantize_model(m, get_preset("genie", "w4a4"))


def test_zsq_quantize_takes_a_users_module():
    import zsq

    m = Hand()  # left in train mode: zsq must not even switch the caller's module to eval
    with pytest.raises(ZsqError, match=r"needs meta=ModelMeta\(\.\.\.\) or input_size=") as e:
        zsq.quantize(m, method="bn-minmax", bits="w8a8")
    assert "\n" not in str(e.value)
    with pytest.raises(ZsqError, match=r"or mean= "):
        zsq.quantize(zsq.ModelSource(m, input_size=(3, 16, 16)), method="bn-minmax", bits="w8a8")
    res = zsq.quantize(zsq.ModelSource(m, input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3),
                       method="bn-minmax", bits="w8a8")
    assert isinstance(res, zsq.QuantResult) and res.report["model"] == "module:Hand"
    assert res.report["bits"] == "w8a8" and res.report["capture"] == "fx"
    assert isinstance(res.model.stem, PaddedConv) and not hasattr(m, "zsq_meta")  # caller's module untouched
    assert m.training and all(t.training for t in m.modules())
    assert res.model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_inspect_prints_the_plan_as_json(capsys):
    import json

    from zsq.cli import main

    assert main(["inspect", "cifar10_resnet20", "--preset", "genie", "--bits", "w4a4", "--json", "--quiet"]) in (0, None)
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["layers"]) == 20 and plan["layers"][0]["a_bits"] is None
    assert len(plan["residual_quantizers"]) == 9 and len(plan["shared"]) == 9
    assert sum(u["kind"] == "block" for u in plan["units"]) == 9
    reads = {a["quantizer"]: a["reads"] for a in plan["activation_quantizers"]}
    assert reads["layer1.0.conv2.input_quant"] == "layer1.0.relu1"


def test_a_users_module_with_inserted_quantizers_saves_and_loads(tmp_path):
    import zsq

    torch.manual_seed(0)
    m = Hand().eval()
    res = zsq.quantize(zsq.ModelSource(m, input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3),
                       method="bn-minmax", bits="w4a4", out=tmp_path / "q")
    assert any(n.endswith("_skip_quant") for n in res.model.zsq_quant_plan["residual"])  # `out += x` got one
    loaded = zsq.load_quantized(tmp_path / "q", model_factory=lambda name: Hand())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model(x))


class Functional(nn.Module):
    """A conv and a linear called functionally with the module's own parameters (get_attr in fx)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.2)
        self.head = nn.Parameter(torch.randn(3, 4) * 0.2)

    def forward(self, x):
        x = F.relu(F.conv2d(F.relu(self.stem(x)), self.w, padding=1))
        return F.linear(x.mean((2, 3)), self.head)


def test_functional_conv_and_linear_stay_float_and_say_so(caplog):
    """zsq quantizes Conv2d/Linear modules; a functional call stays float, listed in the plan and logged,
    its output untouched by quantization, and strict refuses it with a one-line error."""
    m = _meta(Functional(), 8, 3)
    q = quantize_model(m, get_preset("genie", "w4a4"))
    kept = q.zsq_quant_plan["kept_float"]
    assert [(k["layer"], k["type"]) for k in kept] == [("conv2d", "conv2d"), ("linear", "linear")]
    assert all("functional call" in k["why"] for k in kept)
    err = caplog.text
    assert "kept in float: conv2d (conv2d): a functional call" in err and "kept in float: linear (linear)" in err
    assert [n for n, _ in quant_layers(q)] == ["stem"]  # the functional weights were not touched
    assert torch.equal(q.w, m.w) and torch.equal(q.head, m.head)
    with pytest.raises(ZsqError, match=r"^--strict: layer conv2d \(conv2d\) would stay float: a functional call"
                                       r".*\(2 such layer\(s\)\)") as e:
        quantize_model(m, get_preset("genie", "w4a4"), strict=True)
    assert "\n" not in str(e.value)


def test_zsq_quantize_reports_functional_layers_and_strict_refuses_before_any_work():
    import zsq

    meta = dict(input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    kw = dict(method="bn-minmax", bits="w8a8")
    m = Functional().eval()
    with pytest.raises(ZsqError, match=r"--strict: layer conv2d \(conv2d\) would stay float"):
        zsq.quantize(zsq.ModelSource(m, **meta), strict=True, **kw)
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), Functional()).eval()
    res = zsq.quantize(zsq.ModelSource(m, **meta), **kw)
    assert res.report["kept_float"] == ["2.conv2d", "2.linear"]
