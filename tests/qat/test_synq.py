"""SynQ's parts (zsq/qat/synq.py): the low-pass filter, Grad-CAM alignment, the easy-sample CE, and the method
and add-on through the front door with their options checked."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zsq
from tests.tiny_models import TINY_META, TinyResNet, tiny_factory, tiny_images
from zsq.errors import ZsqError
from zsq.models.meta import ModelMeta, set_meta
from zsq.qat.synq import (SynQParts, cam_target_layer, easy_mask, gaussian_lowpass_kernel, grad_cam, lowpass,
                          masked_ce)
from zsq.qat.training_config import SynQConfig, method_config, synq_config


# ---- I1: low-pass filter ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(16, 16), (15, 15), (8, 11)])
def test_a_constant_image_passes_unchanged(size):
    x = torch.full((2, 3, *size), 0.7)
    x[1] = -1.3
    y = lowpass(x, 4.0)
    assert y.shape == x.shape and y.dtype == x.dtype and not y.is_complex()
    assert torch.allclose(y, x, atol=1e-5)


@pytest.mark.parametrize("h,w", [(5, 6), (8, 8), (7, 3)])
def test_the_kernel_is_one_at_the_dc_bin_and_falls_from_it(h, w):
    k = gaussian_lowpass_kernel(h, w, 2.0)
    assert k.shape == (h, w) and float(k[h // 2, w // 2]) == 1.0
    assert int(k.argmax()) == (h // 2) * w + w // 2
    assert math.isclose(float(k[0, 0]), math.exp(-((h // 2) ** 2 + (w // 2) ** 2) / 8.0), rel_tol=1e-6)


@pytest.mark.parametrize("d0", [2.0, 5.0, 80.0])
def test_a_checkerboard_is_scaled_by_the_kernel_at_nyquist(d0):
    # (-1)^(r+c) is one frequency, D^2 = 8^2 + 8^2 from the DC bin: the filter multiplies it by exp(-128/(2 d0^2))
    r = torch.arange(16)
    checker = ((r[:, None] + r[None, :]) % 2 * 2 - 1).float().expand(1, 3, 16, 16)
    y = lowpass(checker + 0.25, d0)
    gain = math.exp(-128.0 / (2 * d0 ** 2))
    assert torch.allclose(y, 0.25 + gain * checker, atol=1e-5)
    if d0 == 2.0:
        assert float((y - 0.25).abs().max()) < 1e-6  # removed; the mean stays
    if d0 == 80.0:
        assert gain > 0.98  # at 16x16, D0 = 80 barely filters (spec: G >= 0.96 at 32x32)


def test_a_one_dimensional_cosine_keeps_its_shape_and_loses_amplitude():
    rows = torch.arange(16).float()
    x = torch.cos(2 * math.pi * 3 * rows / 16)[:, None].expand(16, 16)[None, None]
    y = lowpass(x, 3.0)
    assert torch.allclose(y, math.exp(-9 / 18.0) * x, atol=1e-5)


def test_high_frequency_energy_falls_and_a_huge_d0_is_the_identity():
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lowpass(x, 1e6), x, atol=1e-5)
    d0 = 2.0
    y = lowpass(x, d0)
    dist = gaussian_lowpass_kernel(16, 16, 1.0).log().mul(-2).sqrt()  # D per shifted bin
    far = dist > 2 * d0

    def energy(t):
        return torch.fft.fftshift(torch.fft.fft2(t), dim=(-2, -1)).abs().pow(2)[..., far].sum()

    assert float(energy(y)) <= math.exp(-4) * float(energy(x)) + 1e-6  # G <= exp(-2) there, energy G^2
    assert float(energy(y)) > 0


# ---- I3: easy-sample CE ------------------------------------------------------------------------------
def test_easy_mask_is_strict_on_teacher_difficulty():
    # p_y = 0.9, 0.5, 0.2, and 0.5 but for another label: difficulty 0.1, 0.5, 0.8, 0.5
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.25, 0.25], [0.2, 0.4, 0.4], [0.25, 0.5, 0.25]])
    logits = probs.log() + 3.0  # a shift does not change the softmax
    labels = torch.tensor([0, 0, 0, 1])
    assert easy_mask(logits, labels, 0.5).tolist() == [True, False, False, False]
    assert easy_mask(logits, labels, 0.51).tolist() == [True, True, False, True]
    assert easy_mask(logits, labels, 0.0).tolist() == [False] * 4
    assert easy_mask(logits, labels, 1.0).tolist() == [True] * 4


def test_masked_ce_counts_hard_samples_as_ln_c_without_gradient():
    s = torch.randn(5, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    y = torch.tensor([1, 2, 3, 0, 1])
    mask = torch.tensor([True, False, True, False, False])
    loss = masked_ce(s, y, mask)
    per = F.cross_entropy(s.detach(), y, reduction="none")
    expected = (per[mask].sum() + 3 * math.log(4)) / 5
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert torch.all(s.grad[~mask] == 0) and torch.all(s.grad[mask].abs().sum(1) > 0)
    s.grad = None
    none = masked_ce(s, y, torch.zeros(5, dtype=torch.bool))
    assert math.isclose(float(none.detach()), math.log(4), rel_tol=1e-6)
    none.backward()
    assert torch.all(s.grad == 0)


# ---- I2: Grad-CAM alignment --------------------------------------------------------------------------
def _pair():
    teacher = tiny_factory()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    return teacher, student


def _cam_loss(parts, teacher, student, x, labels):
    x = x.clone().requires_grad_(True)
    t, s = teacher(x), student(x)
    return parts.cam_loss(t, s, labels)


def test_cam_layer_is_the_last_conv_with_a_spatial_output():
    assert cam_target_layer(tiny_factory(), TINY_META.input_size) == "dw"
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 10, 1), nn.Flatten())
    assert cam_target_layer(net, (3, 16, 16)) == "2"  # not the 1x1 classifier conv "5"
    with pytest.raises(ZsqError, match="no Conv2d with a spatial output"):
        cam_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), (3, 2, 2))


def test_cam_maps_are_normalised_per_sample():
    teacher, _ = _pair()
    acts = {}
    teacher.dw.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    x = tiny_images(6).requires_grad_(True)
    logits = teacher(x)
    cam = grad_cam(logits, acts["a"], logits.argmax(1), (16, 16))
    assert cam.shape == (6, 1, 16, 16)
    assert float(cam.detach().min()) >= 0 and float(cam.detach().max()) <= 1 + 1e-6
    assert torch.allclose(cam.flatten(1).amax(1), torch.ones(6), atol=1e-4)


@pytest.mark.parametrize("cam_class", ["argmax", "label"])
def test_cam_loss_is_zero_for_an_equal_student_and_reaches_only_the_student(cam_class):
    teacher, student = _pair()
    cfg = SynQConfig(cam_weight=1.0, cam_class=cam_class)
    parts = SynQParts(teacher, student, cfg, TINY_META.input_size)
    x, labels = tiny_images(8), torch.arange(8) % 10
    assert float(_cam_loss(parts, teacher, student, x, labels).detach()) == 0.0
    with torch.no_grad():
        student.conv1.weight.add_(0.3 * torch.randn(student.conv1.weight.shape, generator=torch.Generator().manual_seed(5)))
    for p in teacher.parameters():  # even a teacher that could take gradients gets none (its map is a target)
        p.requires_grad_(True)
    loss = _cam_loss(parts, teacher, student, x, labels)
    assert float(loss.detach()) > 1e-4
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert float(student.conv1.weight.grad.abs().sum()) > 0 and float(student.dw.weight.grad.abs().sum()) > 0
    assert student.fc.weight.grad is None  # the Grad-CAM weights are constants: no path through the head
    parts.close()
    assert not teacher.dw._forward_hooks and not student.dw._forward_hooks


def test_a_cam_layer_that_is_not_there_is_refused():
    teacher, student = _pair()
    with pytest.raises(ZsqError, match="cam_layer 'nope' is not a module"):
        SynQParts(teacher, student, SynQConfig(cam_layer="nope"), TINY_META.input_size)
    assert not teacher.dw._forward_hooks


# ---- the method and the add-on -----------------------------------------------------------------------
def test_defaults_follow_the_spec():
    cifar10 = ModelMeta(name="c", num_classes=10, input_size=(3, 32, 32), mean=(0,) * 3, std=(1,) * 3)
    imnet = ModelMeta(name="i", num_classes=1000, input_size=(3, 224, 224), mean=(0,) * 3, std=(1,) * 3)
    c, i = synq_config(cifar10), synq_config(imnet)
    assert (c.d0, c.tau, c.ce_weight, c.cam_weight, c.perturbed_fa) == (80.0, 0.7, 5.0, 200.0, False)
    assert (i.d0, i.tau, i.ce_weight, i.cam_weight, i.perturbed_fa) == (80.0, 0.5, 0.5, 50.0, True)
    paper = method_config("synq", imnet, "paper")
    assert (paper.epochs, paper.iters_per_epoch, paper.batch_size, paper.lr) == (101, 200, 16, 1e-6)
    assert paper.hast.eps == 0.01 and paper.kd_scale == 8000.0 and paper.synq == i
    assert zsq.methods.get_method("synq").default_synth == "synq"


def test_synq_runs_end_to_end_through_quantize(tmp_path):
    model = set_meta(TinyResNet(c=4, blocks=("layer1",), depthwise=False).eval(), TINY_META)
    res = zsq.quantize(model, method="synq", bits="w4a4", calibration=zsq.Calibration(num_images=8),
                       budget=zsq.RunBudget("quick", iters=2, epochs=2, iters_per_epoch=2, batch_size=4),
                       out=tmp_path / "run", options={"synq_d0": 20.0})
    rep = res.report["method_report"]
    cfg = rep["config"]
    assert cfg["method"] == "synq" and cfg["synq"]["d0"] == 20.0 and cfg["synq"]["tau"] == 0.7
    losses = rep["epochs"][-1]["losses"]
    assert losses["synq_cam"] > 0 and losses["synq_ce"] > 0 and losses["fa_adv"] == 0.0  # CIFAR: no FA on x~
    assert rep["data"] == "synthetic:synq"
    assert not model.layer1.conv2._forward_hooks


def test_synq_is_an_add_on_to_gdfq(tmp_path):
    model = set_meta(TinyResNet(c=4, blocks=("layer1",), depthwise=False).eval(), TINY_META)
    res = zsq.quantize(model, method="gdfq", bits="w4a4",
                       budget=zsq.RunBudget("quick", epochs=2, iters_per_epoch=2, batch_size=4),
                       options={"synq": True, "synq_cam_class": "label", "synq_lowpass": False})
    cfg = res.report["method_report"]["config"]
    assert cfg["synq"]["cam_class"] == "label" and cfg["synq"]["lowpass"] is False and cfg["synq"]["tau"] == 0.7
    losses = res.report["method_report"]["epochs"][-1]["losses"]
    assert losses["synq_cam"] > 0 and "synq_easy" in losses and losses["synq_ce"] > 0
    assert "ce" not in losses  # gdfq's plain CE gives way to SynQ's masked CE


def test_synq_on_hast_keeps_fa_on_the_perturbed_copy_when_asked():
    teacher = set_meta(TinyResNet(c=4, blocks=("layer1",), depthwise=False).eval(), TINY_META)
    base = method_config("hast", TINY_META, "quick").rescaled(epochs=2, iters_per_epoch=2, batch_size=4,
                                                              warmup_epochs=1, live_range_epochs=1)
    images = tiny_images(8)
    for fa in (False, True):
        cfg = base.with_synq(True, TINY_META).with_options(synq_perturbed_fa=fa, synq_ce_weight=0.0)
        student, rep = zsq.qat.distill(teacher, zsq.get_preset("gdfq", "w4a4"), cfg, fixed=images)
        losses = rep["epochs"][-1]["losses"]
        assert (losses["fa_adv"] > 0) == fa and losses["synq_ce"] == 0.0 and losses["synq_cam"] > 0
        assert not teacher.layer1.conv2._forward_hooks


@pytest.mark.parametrize("method,options,needle", [
    ("synq", {"synq_d0": 0}, "synq d0 must be > 0.0"),
    ("synq", {"synq_tau": 1.5}, "synq tau must be >= 0.0 and <= 1.0, got 1.5"),
    ("synq", {"synq_cam_weight": -1}, "synq cam_weight must be >= 0.0"),
    ("synq", {"synq_cam_class": "true"}, "cam_class must be one of ('argmax', 'label')"),
    ("synq", {"synq_lowpass": "yes"}, "lowpass must be true or false"),
    ("synq", {"synq": False}, "use method hast"),
    ("hast", {"synq_d0": 40}, "synq (true turns SynQ on"),
    ("hast", {"synq": "on"}, "synq must be true or false"),
    ("hast-paper", {"synq": True}, "not to hast-paper"),
])
def test_bad_synq_options_are_one_line_errors_before_any_work(tmp_path, method, options, needle):
    model = set_meta(TinyResNet(c=4, blocks=("layer1",), depthwise=False).eval(), TINY_META)
    with pytest.raises(ZsqError) as e:
        zsq.quantize(model, method=method, bits="w4a4", out=tmp_path / "o", options=options)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
