"""A BatchNorm that runs its own activation (timm's BatchNormAct2d) folds into the conv before it and
keeps its activation, so the deploy preset puts the conv, its BN and its ReLU6 into one integer
kernel. Without timm: a stand-in with timm's forward, registered as a BN-act type for the test."""
import copy
from collections import Counter
from dataclasses import replace

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.tiny_models import TINY_META, tiny_images
from zsq.export.fold import fold_quantized_batchnorm
from zsq.export.onnx import export_onnx
from zsq.export.parity import check_parity
from zsq.models.meta import set_meta
from zsq.quant import calibrate, calibrate_from_bn, get_preset, quantize_model
from zsq.quant import modules as qmodules
from zsq.quant.modules import FoldedBatchNorm, FoldedBatchNormAct, QuantAct
from zsq.quant.state import quantizers_disabled


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d forward (eval and train), without timm."""

    def __init__(self, c: int, apply_act: bool = True):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU6(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, bn_training,
                         self.momentum, self.eps)
        return self.act(self.drop(x))


class ActThenDrop(BatchNormAct2d):
    """Not timm's forward: the activation runs before ``drop`` and a shift follows it."""

    def forward(self, x):
        return self.drop(self.act(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                               False, 0.0, self.eps))) + 0.5


class Net(nn.Module):
    """stem -> BN+ReLU6; an inverted-residual-like block: depthwise -> BN+ReLU6 -> pointwise -> BN (no act),
    added to the block input; pool; classifier. ``bn_act`` is the BN-act class used."""

    def __init__(self, bn_act=BatchNormAct2d, c: int = 8):
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), bn_act(c)
        self.dw, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), bn_act(c)
        self.pw, self.bn3 = nn.Conv2d(c, c, 1, bias=False), bn_act(c, apply_act=False)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        x = x + self.bn3(self.pw(self.bn2(self.dw(x))))
        return self.fc(x.mean((2, 3)))


def _net(bn_act=BatchNormAct2d, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = Net(bn_act)
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics that make the fold change the weights
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return set_meta(net.eval(), TINY_META)


@pytest.fixture
def registered(monkeypatch):
    types = qmodules.BN_ACT_TYPES | {(BatchNormAct2d.__module__, "BatchNormAct2d"),
                                     (ActThenDrop.__module__, "ActThenDrop")}
    monkeypatch.setattr(qmodules, "BN_ACT_TYPES", types)


def test_bn_act_folds_and_keeps_its_activation(registered):
    net = _net()
    q = quantize_model(net, get_preset("deploy", "w8a8"))
    plan = q.zsq_quant_plan
    assert plan["folded_bn"] == [["stem", "bn1"], ["dw", "bn2"], ["pw", "bn3"]]
    assert all(isinstance(getattr(q, n), FoldedBatchNormAct) for n in ("bn1", "bn2", "bn3"))
    # the after-activation quantizers sit on the BN-act's own ReLU6; the conv output with no
    # activation (bn3, read by the add) gets its quantizer on the folded BN inside
    assert isinstance(q.bn1.act, QuantAct) and isinstance(q.bn2.act, QuantAct) and isinstance(q.bn3.act, nn.Identity)
    assert plan["folded_outputs"] == ["bn3.bn"]
    assert isinstance(q.bn3.bn, QuantAct) and isinstance(q.bn3.bn.act, FoldedBatchNorm)
    torch.testing.assert_close(q.bn2.bn.weight, net.bn2.weight.detach())  # gamma kept for bn-minmax
    x = tiny_images(8)
    with quantizers_disabled(q), torch.no_grad():
        got = q(x)
    with torch.no_grad():
        ref = net(x)
    assert not torch.equal(ref, net.fc.bias.expand_as(ref))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the BN-act's ReLU6 clips: its quantizer's range comes from a simulation that runs it
    calibrate_from_bn(q, num_images=8)
    scale, zp = (t.detach() for t in q.bn1.act.quant.qparams())
    hi = float((q.bn1.act.quant.qmax - zp) * scale)
    assert float(zp) == 0.0 and 0.0 < hi <= 6.0 + float(scale)


def test_bn_act_model_runs_in_integer_kernels_and_agrees(registered, tmp_path):
    q = quantize_model(_net(), get_preset("deploy", "w8a8"))
    calibrate(q, tiny_images(32, seed=7), batch_size=16)
    info = export_onnx(q, tmp_path / "m.onnx")
    assert "BatchNormalization" not in info["ops"], info["ops"]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0, ops
    res = check_parity(q, tmp_path / "m.onnx", tiny_images(64, seed=4), threads=1)
    assert res["top1_agreement"] == 1.0 and res["max_rel_logit_diff"] < 0.05, res


def test_a_bn_act_with_another_forward_stays_unfolded(registered):
    net = _net(ActThenDrop)
    q = quantize_model(net, get_preset("deploy", "w8a8"))
    assert q.zsq_quant_plan["folded_bn"] == []
    assert all(type(getattr(q, n)) is ActThenDrop for n in ("bn1", "bn2", "bn3"))
    x = tiny_images(8)
    with quantizers_disabled(q), torch.no_grad():
        assert torch.equal(q(x), net(x))


def test_an_unregistered_bn_act_class_stays_unfolded():
    """Recognition is by exact class: a BatchNorm2d subclass zsq does not know is never folded."""
    q = quantize_model(_net(), get_preset("deploy", "w8a8"))
    assert q.zsq_quant_plan["folded_bn"] == []


def test_folding_after_quantization_keeps_the_activation(registered):
    """``export --fold`` (paper presets) folds the BN-act into the quantized conv and keeps its ReLU6."""
    cfg = get_preset("genie", "w8a8")
    cfg = replace(cfg, weight=replace(cfg.weight, lp_ratios=20), act=replace(cfg.act, lp_ratios=20))
    q = quantize_model(_net(), cfg)
    calibrate(q, tiny_images(32, seed=7), batch_size=16)
    x = tiny_images(16, seed=3)
    folded, pairs = fold_quantized_batchnorm(q, x)
    assert pairs == [["stem", "bn1"], ["dw", "bn2"], ["pw", "bn3"]]
    assert isinstance(folded.bn1, FoldedBatchNormAct)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), copy.deepcopy(q)(x), rtol=1e-4, atol=1e-4)
