import pytest
import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.ptq.soft_round import (SoftRoundQuantizer, inverse_rectified_sigmoid, rectified_sigmoid, to_uniform)
from zsq.ptq.schedule import BetaSchedule
from zsq.quant.modules import QuantConv2d, make_weight_quantizer
from zsq.quant.quantizer import QuantSpec, UniformQuantizer

W4 = QuantSpec(bits=4, per_channel=True, symmetric=False, observer="lp")


def _conv(bits=4, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 6, 3, bias=False)
    return QuantConv2d.from_float(conv, W4.with_bits(bits), None)


def test_rectified_sigmoid_inverse_and_range():
    h = torch.linspace(0.0, 0.999, 101)
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-5)
    assert rectified_sigmoid(torch.tensor(-50.0)) == 0.0 and rectified_sigmoid(torch.tensor(50.0)) == 1.0


def test_soft_weight_equals_fp_weight_inside_clip_range():
    layer = _conv()
    w = layer.weight.detach().clone()
    base = layer.weight_quant
    s, z = base.qparams(w)
    lo, hi = (base.qmin - z) * s, (base.qmax - z) * s
    soft = SoftRoundQuantizer(w, base, learn_scale=True)
    w_soft = soft(w)
    inside = (w >= lo) & (w <= hi)
    assert inside.float().mean() > 0.5  # the Lp search clips some, keeps most
    assert torch.allclose(w_soft[inside], w[inside], atol=1e-5)
    # outside the range the soft weight is clipped to the grid ends
    assert torch.all(w_soft <= hi + 1e-6) and torch.all(w_soft >= lo - 1e-6)


def test_hardening_is_floor_plus_indicator():
    layer = _conv(bits=3)
    w = layer.weight.detach().clone()
    soft = SoftRoundQuantizer(w, layer.weight_quant, learn_scale=False)
    with torch.no_grad():
        soft.v.copy_(torch.randn_like(soft.v))
    s0, z = layer.weight_quant.qparams(w)
    expected_codes = torch.clamp(torch.floor(w / s0) + (soft.v >= 0).float() + z, 0, 7)
    soft.harden()
    assert torch.equal(soft.codes(), expected_codes)
    assert torch.allclose(soft(w), s0 * (expected_codes - z))
    # written back as a plain UniformQuantizer: same values and integer codes
    layer.weight_quant = soft
    uq = to_uniform(layer)
    assert isinstance(uq, UniformQuantizer)
    assert torch.allclose(layer.quantized_weight(), s0 * (expected_codes - z), atol=1e-6)
    assert torch.equal(uq.int_repr(layer.weight), expected_codes.to(torch.int32))


def test_hard_rounding_uses_frozen_base_after_scale_changes():
    layer = _conv()
    w = layer.weight.detach().clone()
    soft = SoftRoundQuantizer(w, layer.weight_quant, learn_scale=True)
    base0 = soft.base_int.clone()
    with torch.no_grad():
        soft.scale.mul_(1.3)
    assert torch.equal(soft.base_int, base0)
    codes = soft.codes()
    assert torch.equal(codes, torch.clamp(base0 + (soft.v >= 0).float() + soft.zero_point, 0, 15))


def test_rounding_loss_falls_as_h_goes_binary():
    layer = _conv()
    soft = SoftRoundQuantizer(layer.weight, layer.weight_quant, learn_scale=False)
    losses = []
    for mag in (0.0, 0.5, 1.0, 2.0, 20.0):
        with torch.no_grad():
            soft.v.copy_(torch.sign(torch.randn_like(soft.v)) * mag)
        losses.append(float(soft.round_loss(beta=2.0)))
    assert all(a > b for a, b in zip(losses, losses[1:]))
    assert losses[-1] == 0.0  # h is exactly 0 or 1 for |V| large
    assert losses[0] == pytest.approx(soft.v.numel(), rel=1e-5)  # h = 0.5 everywhere


def test_soft_round_refuses_dynamic_grid():
    conv = nn.Conv2d(3, 4, 3)
    spec = QuantSpec(bits=4, per_channel=True, dynamic=True, ste="identity")
    q = make_weight_quantizer(conv.weight, spec)
    with pytest.raises(ZsqError):
        SoftRoundQuantizer(conv.weight, q, learn_scale=True)


def test_beta_schedule():
    b = BetaSchedule(1000, 20.0, 2.0, 0.2)
    assert b.beta(1) == 20.0 and b.beta(199) == 20.0
    assert not b.rounding_active(199) and b.rounding_active(200)
    assert b.beta(200) == pytest.approx(20.0)
    assert b.beta(600) == pytest.approx(11.0)
    assert b.beta(1000) == pytest.approx(2.0)
    vals = [b.beta(t) for t in range(200, 1001)]
    assert all(x >= y for x, y in zip(vals, vals[1:]))
    with pytest.raises(ZsqError):
        BetaSchedule(0)
    with pytest.raises(ZsqError):
        BetaSchedule(10, warmup=1.0)


def _one_adam_step(soft, w, lr):
    opt = torch.optim.Adam([soft.scale_parameter()], lr=lr)
    target = torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * w.abs().mean()
    ((soft(w) - target) ** 2).sum().backward()
    opt.step()
    return soft.step_size().detach().flatten()


def test_relative_step_moves_every_channel_by_the_same_fraction():
    layer = _conv()
    with torch.no_grad():  # channels whose steps differ by up to 100x, as in a depthwise conv at 8 bits
        layer.weight.mul_(torch.logspace(-2, 0, 6).view(6, 1, 1, 1))
    w = layer.weight.detach().clone()
    s0 = layer.weight_quant.qparams(w)[0].detach().flatten().clone()
    rel = SoftRoundQuantizer(w, layer.weight_quant, learn_scale=True, relative_scale=True)
    assert torch.allclose(rel(w), SoftRoundQuantizer(w, layer.weight_quant, learn_scale=True)(w))  # same start
    moved = _one_adam_step(rel, w, 1e-2) / s0 - 1  # Adam's first step is lr * sign(gradient)
    assert torch.allclose(moved.abs(), torch.full_like(moved, 1e-2), rtol=1e-3), moved
    absolute = _one_adam_step(SoftRoundQuantizer(w, layer.weight_quant, learn_scale=True), w, 1e-4) - s0
    assert torch.allclose(absolute.abs(), torch.full_like(absolute, 1e-4), rtol=1e-2)  # same size, any step
    layer.weight_quant = rel
    uq = to_uniform(layer)  # the learned step is what the plain quantizer keeps
    assert torch.allclose(uq.scale.detach().flatten(), (1 + moved) * s0)


def test_fixed_step_has_no_scale_parameter():
    layer = _conv()
    soft = SoftRoundQuantizer(layer.weight.detach(), layer.weight_quant, learn_scale=False, relative_scale=True)
    assert not soft.relative_scale and not any(p is not soft.v for p in soft.parameters())
    with pytest.raises(ZsqError, match="keeps its step fixed"):
        soft.scale_parameter()


def test_a_squant_start_hardens_to_squants_codes_and_moves_only_the_flipped_elements():
    from zsq.quant.squant import objective, squant_codes, weight_as_groups
    layer = _conv(seed=3)
    w = layer.weight.detach().clone()
    near = SoftRoundQuantizer(w, layer.weight_quant, learn_scale=True)
    soft = SoftRoundQuantizer(w, layer.weight_quant, learn_scale=True)
    stats = soft.start_at_squant(w)
    s, z = near.step_size().detach(), near.zero_point
    # the reference: SQuant on the same grid, computed directly
    m = w.shape[0]
    zz = z.double().reshape(-1, 1, 1).expand(m, 1, 1)
    ref, _ = squant_codes(weight_as_groups(w / s), near.qmin - zz, near.qmax - zz)
    inside = ((near.base_int + z >= near.qmin) & (near.base_int + z + 1 <= near.qmax))
    got = soft.codes() - z
    assert torch.equal(got[inside].double(), ref.reshape(w.shape)[inside])
    flipped = near.codes() != soft.codes()
    assert stats.kernel_flips + stats.channel_flips > 0 and 0 < int(flipped.sum()) < w.numel() // 4
    # unflipped elements start exactly where round-to-nearest's do; flipped ones just past the tie
    assert torch.equal(soft.v[~flipped], near.v[~flipped])
    assert torch.allclose(soft.h()[flipped], torch.full_like(soft.h()[flipped], 0.5), atol=0.0101)
    # SQuant's objective is lower on the hardened start than round-to-nearest's
    soft.harden(); near.harden()
    err = lambda q: weight_as_groups((q(w) - w.clamp(*(((q.qmin - z) * s, (q.qmax - z) * s)))) / s)
    assert objective(err(soft)) < objective(err(near))


def test_init_rounding_is_checked_and_refused_beside_gptq_codes(tiny, tiny_images):
    from zsq.methods.registry import QuantJob
    from zsq.ptq.budgets import EngineOptions
    from zsq.ptq.reconstruction_methods import genie
    from zsq.quant.qconfig import get_preset
    with pytest.raises(ZsqError, match="init_rounding must be one of"):
        EngineOptions(init_rounding="floor")
    job = QuantJob(calib=tiny_images, iters=2, batch_size=16, extra={"rounding": "gptq", "init_rounding": "squant"})
    with pytest.raises(ZsqError, match="drop one of them"):
        genie(tiny, get_preset("genie", "w4a4"), job)


def test_genie_from_a_squant_start_differs_from_nearest_and_records_it(tiny, tiny_images):
    from zsq.methods.registry import QuantJob
    from zsq.ptq.reconstruction_methods import genie
    from zsq.quant.qconfig import get_preset
    from zsq.quant.inventory import quant_layers
    runs = {}
    for init in ("nearest", "squant"):
        job = QuantJob(calib=tiny_images, iters=0 + 1, batch_size=16, extra={"init_rounding": init})
        res = genie(tiny, get_preset("genie", "w4a4"), job)
        runs[init] = torch.cat([layer.weight_quant(layer.weight).flatten() for _, layer in quant_layers(res.model)])
    assert not torch.equal(runs["nearest"], runs["squant"])
