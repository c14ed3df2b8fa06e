"""Zero pads move into the conv that reads them: exact in float, and integer kernels then cover the
TF "SAME"-padded depthwise convs of EfficientNet-Lite (onnxruntime left them in float before)."""
import io
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from tests.tiny_models import TINY_META
from zsq.export.onnx import export_onnx
from zsq.export.onnx_passes import fold_zero_pads
from zsq.models.efficientnet_lite import SamePad2d
from zsq.models.meta import set_meta
from zsq.quant import calibrate, get_preset, quantize_model


def _float_graph(module: nn.Module, size=(3, 9, 9)) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, *size),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["out"], dynamic_axes={"input": {0: "b"}, "out": {0: "b"}})
    return onnx.load_from_string(buf.getvalue())


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


def _ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("pad", [nn.ZeroPad2d((0, 1, 0, 1)), nn.ZeroPad2d((2, 1, 0, 3)), SamePad2d(3, 2)])
def test_zero_pad_folds_into_the_conv_exactly(pad):
    torch.manual_seed(0)
    module = nn.Sequential(pad, nn.Conv2d(3, 4, 3, stride=2, padding=1))
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(np.float32)
    graph = _float_graph(module)
    before = _run(graph, x)
    assert _ops(graph)["Pad"] == 1
    assert len(fold_zero_pads(graph)) == 1
    assert _ops(graph)["Pad"] == 0
    onnx.checker.check_model(graph, full_check=True)
    np.testing.assert_allclose(_run(graph, x), before, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(before, module(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", [nn.ConstantPad2d(1, 0.5), nn.ReflectionPad2d(1)])
def test_other_pads_stay(pad):
    graph = _float_graph(nn.Sequential(pad, nn.Conv2d(3, 4, 3)))
    assert fold_zero_pads(graph) == [] and _ops(graph)["Pad"] == 1


def test_a_pad_with_two_readers_stays():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.pad, self.a, self.b = nn.ZeroPad2d(1), nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            p = self.pad(x)
            return self.a(p) + self.b(p)

    graph = _float_graph(Two())
    assert fold_zero_pads(graph) == [] and _ops(graph)["Pad"] == 1


class SamePadNet(nn.Module):
    """Lite0's layout: a SAME pad module before a stride-2 depthwise conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU6()
        self.pad = SamePad2d(3, 2)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.relu2 = nn.ReLU6()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu2(self.dw(self.pad(self.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def test_same_padded_depthwise_conv_runs_as_qlinearconv(tmp_path):
    torch.manual_seed(0)
    net = set_meta(SamePadNet().eval(), TINY_META)
    q = quantize_model(net, get_preset("deploy", "w8a8"))
    calibrate(q, torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1)), batch_size=16)
    info = export_onnx(q, tmp_path / "m.onnx")
    assert info["pads_folded_into_convs"] == ["/dw/Conv"] and "Pad" not in info["ops"], info
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0, ops
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = q(x).numpy()
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_the_folded_pads_leave_no_dead_nodes(tmp_path):
    torch.manual_seed(0)
    q = quantize_model(set_meta(SamePadNet().eval(), TINY_META), get_preset("deploy", "w8a8"))
    calibrate(q, torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1)), batch_size=16)
    graph = onnx.load(export_onnx(q, tmp_path / "m.onnx")["onnx"]).graph
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    assert all(any(o in read for o in n.output) for n in graph.node)
    assert all(i.name in read for i in graph.initializer)


class RuntimeSamePadConv(nn.Conv2d):
    """timm's Conv2dSame without timm: the TF "SAME" pad is computed from the input's size at run time,
    so the export holds Shape/Gather/Div/Ceil/... -> Pad, constant only once the input shape is known."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        pads = []
        for size, k, s in ((iw, self.kernel_size[1], self.stride[1]), (ih, self.kernel_size[0], self.stride[0])):
            p = torch.clamp(((size / s).ceil() - 1) * s + (k - 1) + 1 - size, min=0) if isinstance(size, torch.Tensor) \
                else max((-(-size // s) - 1) * s + k - size, 0)
            pads += [p // 2, p - p // 2]
        return nn.functional.conv2d(nn.functional.pad(x, pads), self.weight, self.bias, self.stride, 0,
                                    self.dilation, self.groups)


def test_chained_run_time_pads_all_fold_and_their_shape_computation_goes():
    """The second pad's input shape is unknown to shape inference until the first Pad is folded: the
    pass repeats until nothing folds, and nothing of the run-time pad arithmetic is left."""
    torch.manual_seed(0)
    module = nn.Sequential(RuntimeSamePadConv(3, 4, 3, stride=2), nn.ReLU(), RuntimeSamePadConv(4, 4, 3, stride=2, groups=4),
                           RuntimeSamePadConv(4, 5, 5, stride=2))
    x = np.random.default_rng(0).standard_normal((2, 3, 13, 11)).astype(np.float32)
    graph = _float_graph(module, size=(3, 13, 11))
    before = _run(graph, x)
    assert _ops(graph)["Pad"] == 3 and _ops(graph)["Shape"] >= 3
    assert len(fold_zero_pads(graph)) == 3
    left = _ops(graph)
    assert left == Counter({"Conv": 3, "Relu": 1}), left  # no Pad, no Shape/Gather/Ceil/Cast/Concat
    # 13x11 -> 7x6 -> 4x3: TF SAME pads, [h_begin, w_begin, h_end, w_end], the odd pixel at the end
    assert [list(a.ints) for n in graph.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"] == \
        [[1, 1, 1, 1], [1, 0, 1, 1], [1, 2, 2, 2]]
    onnx.checker.check_model(graph, full_check=True)
    np.testing.assert_allclose(_run(graph, x), before, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(before, module(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
