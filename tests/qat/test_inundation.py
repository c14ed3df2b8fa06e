import copy

import pytest
import torch
import torch.nn as nn

from tests.conftest import need_asset
from zsq.errors import ZsqError
from zsq.qat.inundation import GIConfig, GradientInundation, choose_alpha, flip_ratio, quantized_weight_layers
from zsq.quant import get_preset, quantize_model


def _tiny_qmodel(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    return quantize_model(net, get_preset("gdfq", "w4a4"), torch.randn(2, 3, 6, 6))


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_rho_decays_on_schedule_and_cap_only_in_first_student_epoch():
    cfg = GIConfig(rho=1e-3, rho_decay=0.1, rho_milestones=(2, 4))
    assert [cfg.rho_at(e) for e in range(6)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    q = _tiny_qmodel()
    gi = GradientInundation(torch.optim.SGD(q.parameters(), lr=1e-4), quantized_weight_layers(q), cfg)
    gi.set_epoch(3, first_student_epoch=True)
    assert gi.rho == pytest.approx(1e-4) and gi.cap == 128.0
    gi.set_epoch(4, first_student_epoch=False)
    assert gi.rho == pytest.approx(1e-5) and gi.cap == cfg.max_alpha


def test_alpha_one_reproduces_plain_nesterov_sgd_exactly():
    a, b = _tiny_qmodel(), _tiny_qmodel()
    plain = torch.optim.SGD(a.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
    gi = GradientInundation(torch.optim.SGD(b.parameters(), lr=1e-4, momentum=0.9, nesterov=True),
                            quantized_weight_layers(b), GIConfig(rho=0.5, first_epoch_cap=1.0))
    gi.set_epoch(0, first_student_epoch=True)  # cap 1: alpha can only be 1
    for step in range(3):
        _grads(a, step), _grads(b, step)
        plain.step()
        res = gi.step()
        assert all(r.alpha == 1.0 for r in res.values())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_momentum_buffer_stays_unscaled_when_alpha_is_large():
    a, b = _tiny_qmodel(), _tiny_qmodel()
    plain = torch.optim.SGD(a.parameters(), lr=1e-6, momentum=0.9, nesterov=True)
    gi = GradientInundation(torch.optim.SGD(b.parameters(), lr=1e-6, momentum=0.9, nesterov=True),
                            quantized_weight_layers(b), GIConfig(rho=0.05))
    gi.set_epoch(0, first_student_epoch=False)
    for step in range(2):
        _grads(a, step), _grads(b, step)
        plain.step()
        res = gi.step()
    assert min(r.alpha for r in res.values()) > 1.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(plain.state[pa]["momentum_buffer"], gi.optimizer.state[pb]["momentum_buffer"])


def test_one_gi_step_reaches_rho_on_a_real_resnet20_layer():
    import zsq.models

    teacher = zsq.models.load("cifar10_resnet20", weights=need_asset("cifar10/resnet20-12fca82f.th"))
    q = quantize_model(teacher, get_preset("gdfq", "w4a4"))
    layers = [l for l in quantized_weight_layers(q) if l[0] == "layer3.2.conv2"]
    name, w, code_fn = layers[0]
    rho = 1e-3
    opt = torch.optim.SGD([w], lr=1e-4, momentum=0.9, nesterov=True)
    gi = GradientInundation(opt, layers, GIConfig(rho=rho))
    gi.set_epoch(0, first_student_epoch=False)
    w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 1e-2
    before = code_fn(w.detach()).clone()
    w_old = w.detach().clone()
    res = gi.step()[name]
    measured = float((code_fn(w.detach()) != before).float().mean())
    assert res.alpha > 1 and res.reached
    assert measured == pytest.approx(res.ratio)
    # within the bisection tolerance: either |r - rho| < rho/100, or rho lies inside the final
    # bracket [r(lo), r(hi)] that alpha was picked from
    delta = (w.detach() - w_old) / res.alpha
    r_lo = flip_ratio(code_fn, w_old, before, delta, res.bracket[0])
    r_hi = flip_ratio(code_fn, w_old, before, delta, res.bracket[1])
    assert abs(measured - rho) < rho / 100 or (r_lo <= rho <= r_hi and r_lo <= measured <= r_hi)
    assert abs(measured - rho) < 0.5 * rho  # and it is near the target in absolute terms


def test_choose_alpha_doubles_then_bisects_and_caps():
    # r(a) = a * 1e-4 (linear): rho 1e-3 is reached at a = 16 after doubling, bisection hits 10 exactly
    res = choose_alpha(lambda a: a * 1e-4, rho=1e-3, cap=1e6, bisect_steps=5)
    assert res.reached and 8 <= res.alpha <= 16 and abs(res.ratio - 1e-3) <= 1e-3 / 8
    capped = choose_alpha(lambda a: a * 1e-6, rho=1e-3, cap=128.0)
    assert not capped.reached and capped.alpha == 128.0
    assert choose_alpha(lambda a: 0.5, rho=1e-3, cap=128.0).alpha == 1.0


def test_works_with_adam_and_skips_zero_steps():
    q = _tiny_qmodel()
    layers = quantized_weight_layers(q)
    gi = GradientInundation(torch.optim.Adam(q.parameters(), lr=1e-6), layers, GIConfig(rho=0.02))
    gi.set_epoch(0, first_student_epoch=False)
    _grads(q, 0)
    layers[1][1].grad.zero_()
    before = [fn(w.detach()).clone() for _, w, fn in layers]
    res = gi.step()
    conv = res[layers[0][0]]
    assert conv.alpha > 1 and conv.reached
    assert float((layers[0][2](layers[0][1].detach()) != before[0]).float().mean()) == pytest.approx(conv.ratio)
    assert res[layers[1][0]].skipped == "zero step"


def test_unreachable_rho_is_counted_per_layer():
    q = _tiny_qmodel()
    gi = GradientInundation(torch.optim.SGD(q.parameters(), lr=1e-7), quantized_weight_layers(q),
                            GIConfig(rho=0.9, first_epoch_cap=4.0))
    gi.set_epoch(0, first_student_epoch=True)
    _grads(q, 1)
    gi.step()
    summary = gi.epoch_summary()
    assert set(summary["unreached"]) == {n for n, _, _ in quantized_weight_layers(q)}
    assert all(v == pytest.approx(4.0) for v in summary["mean_alpha"].values())


def test_config_and_wrapper_errors():
    with pytest.raises(ZsqError):
        GIConfig(rho=0)
    with pytest.raises(ZsqError):
        GIConfig(first_epoch_cap=0.5)
    q, other = _tiny_qmodel(), _tiny_qmodel(1)
    with pytest.raises(ZsqError, match="not in the wrapped optimizer"):
        GradientInundation(torch.optim.SGD(other.parameters(), lr=1), quantized_weight_layers(q), GIConfig())
    with pytest.raises(ZsqError):
        GradientInundation(torch.optim.SGD(q.parameters(), lr=1), [], GIConfig())
