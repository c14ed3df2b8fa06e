import pytest
import torch

from zsq.errors import ZsqError
from zsq.quant.quantizer import (QuantSpec, UniformQuantizer, fake_quantize, grid_limits, lp_search,
                                 qparams_from_range)


def _on_grid(xq, scale, zp, qmin, qmax):
    q = xq / scale + zp
    assert torch.allclose(q, torch.round(q), atol=1e-4)
    assert q.min() >= qmin - 1e-4 and q.max() <= qmax + 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric,signed", [(False, None), (True, True), (True, False)])
def test_values_on_grid_and_zero_exact(bits, symmetric, signed):
    spec = QuantSpec(bits=bits, symmetric=symmetric, signed=signed)
    q = UniformQuantizer(spec)
    x = torch.randn(1000) * 3 + (0.0 if signed is not False else 3.0)
    if signed is False:
        x = x.clamp(min=0)
    q.init_from(x)
    xq = q(x)
    qmin, qmax = grid_limits(bits, symmetric, bool(signed))
    _on_grid(xq, q.scale, q.zero_point, qmin, qmax)
    assert q(torch.zeros(3)).abs().max().item() == 0.0  # zero is exactly representable
    # at most 2^bits distinct values
    assert torch.unique(xq).numel() <= 2 ** bits
    # a value inside the range is within half a step
    inside = (xq - x).abs()[(x > x.min() * 0.5) & (x < x.max() * 0.5)]
    assert inside.max() <= q.scale.max() / 2 + 1e-5


def test_asymmetric_range_and_zero_point_by_hand():
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), 4, symmetric=False, signed=False)
    assert scale.item() == pytest.approx(4.0 / 15)
    assert zp.item() == round(1.0 / (4.0 / 15))  # 3.75 -> 4
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0, 10.0])
    xq = fake_quantize(x, scale, zp, 0, 15)
    expected = (torch.clamp(torch.round(x / scale) + zp, 0, 15) - zp) * scale
    assert torch.equal(xq, expected)
    assert xq[1].item() == 0.0 and xq[-1].item() == pytest.approx((15 - 4) * 4.0 / 15)


def test_per_channel_scales_differ_per_channel():
    w = torch.randn(8, 4, 3, 3) * torch.arange(1, 9).float().reshape(8, 1, 1, 1)
    q = UniformQuantizer(QuantSpec(bits=4, per_channel=True), num_channels=8)
    q.init_from(w)
    assert q.scale.shape == (8,)
    assert q.scale[7] > 3 * q.scale[0]  # channel 7 spans ~8x the range of channel 0
    assert len(set(q.scale.tolist())) == 8
    for c in range(8):
        lo, hi = min(w[c].min().item(), 0), max(w[c].max().item(), 0)
        assert q.scale[c].item() == pytest.approx((hi - lo) / 15, rel=1e-5)
    _on_grid(q(w), q.scale.reshape(8, 1, 1, 1), q.zero_point.reshape(8, 1, 1, 1), 0, 15)
    codes = q.int_repr(w)
    assert codes.dtype == torch.int32 and codes.min() >= 0 and codes.max() <= 15
    assert torch.allclose((codes - q.zero_point.reshape(8, 1, 1, 1)) * q.scale.reshape(8, 1, 1, 1), q(w))


def test_ste_clip_gradients_match_lsq_by_hand():
    # symmetric signed 4-bit, step 0.5: grid [-8, 7] * 0.5 = [-4, 3.5]
    scale = torch.tensor(0.5, requires_grad=True)
    x = torch.tensor([0.3, 1.26, -5.0, 10.0], requires_grad=True)
    y = fake_quantize(x, scale, torch.tensor(0.0), -8, 7, ste="clip")
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # clipped inputs get no gradient
    # LSQ: d/ds = round(x/s) - x/s inside, qmin or qmax outside
    expected = (round(0.6) - 0.6) + (round(2.52) - 2.52) + (-8) + 7
    assert scale.grad.item() == pytest.approx(expected, abs=1e-5)


def test_ste_identity_passes_gradient_everywhere():
    x = torch.tensor([0.3, -5.0, 10.0], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    y = fake_quantize(x, scale, torch.tensor(8.0), 0, 15, ste="identity")
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))
    assert scale.grad is None or scale.grad.item() == 0.0
    assert y[2].item() == pytest.approx((15 - 8) * 0.5)


def test_learnable_step_is_a_parameter_and_trains():
    q = UniformQuantizer(QuantSpec(bits=4, symmetric=True, learnable=True))
    x = torch.randn(4096)
    q.init_from(x)
    assert isinstance(q.scale, torch.nn.Parameter)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    err0 = (q(x) - x).pow(2).mean().item()
    q.scale.data.mul_(3.0)  # a bad step
    err_bad = (q(x) - x).pow(2).mean().item()
    for _ in range(200):
        opt.zero_grad()
        (q(x) - x).pow(2).mean().backward()
        opt.step()
    err_after = (q(x) - x).pow(2).mean().item()
    assert err_bad > err0 and err_after < err_bad * 0.5


def test_lp_search_matches_brute_force():
    torch.manual_seed(1)
    x = torch.cat([torch.randn(2000), torch.tensor([12.0])])  # an outlier makes clipping worthwhile
    spec = QuantSpec(bits=4, symmetric=True, signed=True, observer="lp", lp_p=2.4, lp_ratios=100)
    scale, _ = lp_search(x, spec, signed=True)
    best, best_r = None, None
    for i in range(100):
        r = 1.0 - i / 100
        s = 2 * 12.0 * r / 15
        err = ((torch.clamp(torch.round(x / s), -8, 7) * s - x).abs() ** 2.4).mean().item()
        if best is None or err < best:
            best, best_r = err, r
    assert scale.item() == pytest.approx(2 * 12.0 * best_r / 15, rel=1e-5)
    assert best_r < 0.6  # the outlier is clipped


def test_ema_observer_follows_gdfq_rule():
    spec = QuantSpec(bits=4, observer="ema", ema_momentum=0.9, ema_bias_correction=True)
    q = UniformQuantizer(spec)
    q.observing, q.enabled = True, False
    x_max, beta_t = 0.0, 1.0
    for step, m in enumerate([2.0, 4.0, 3.0]):
        q(torch.tensor([0.0, m]))
        beta_t *= 0.9
        x_max = (0.9 * x_max + 0.1 * m) / (1 - beta_t)
        assert q.obs_max.item() == pytest.approx(x_max, rel=1e-5)
    assert q.obs_max.item() > 3.0  # the bias correction inflates early ranges (documented quirk)


def test_calibrate_then_freeze_uses_observed_range():
    q = UniformQuantizer(QuantSpec(bits=8))
    q.observing, q.enabled = True, False
    for m in (1.0, 5.0, 2.0):
        assert torch.equal(q(torch.tensor([-1.0, m])), torch.tensor([-1.0, m]))  # passes through
    q.freeze()
    assert q.enabled and not q.observing
    assert q.scale.item() == pytest.approx(6.0 / 255)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(bits=1), "bits must be"), (dict(bits=9), "bits must be"), (dict(observer="mse"), "observer"),
    (dict(signed=True), "symmetric"), (dict(ste="x"), "ste"),
])
def test_bad_spec_is_rejected(kwargs, msg):
    with pytest.raises(ZsqError, match=msg):
        QuantSpec(**kwargs)


def test_coarse_to_fine_lp_search_matches_full_grid():
    torch.manual_seed(0)
    w = torch.randn(64, 3, 3, 3) * torch.rand(64, 1, 1, 1)
    spec = QuantSpec(bits=4, per_channel=True, observer="lp")
    coarse, _ = lp_search(w, spec, signed=False)
    full, _ = lp_search(w, spec, signed=False, coarse_step=1)

    # the same step on (nearly) every channel, and never a worse error where they differ
    assert (coarse == full).float().mean() > 0.9
    for s_c, s_f, ch in zip(coarse, full, w):
        if s_c != s_f:
            def err(s):
                lo = min(ch.min().item(), 0.0)
                zp = round(-lo / s.item())
                xq = (torch.clamp(torch.round(ch / s) + zp, 0, 15) - zp) * s
                return (ch - xq).abs().pow(2.4).mean().item()
            assert err(s_c) <= err(s_f) * 1.02


@pytest.mark.parametrize("ste", ["clip", "identity"])
def test_integer_codes_reproduce_the_fake_quantized_values_exactly(ste):
    # values placed exactly on rounding boundaries (x/s + z = k + 0.5) are where two formulas disagree
    scale, zp = torch.tensor(0.1), torch.tensor(7.0)
    x = (torch.arange(-7, 8).float() + 0.5) * 0.1 + torch.randn(15) * 1e-9
    x = torch.cat([x, torch.randn(1000)])
    xq = fake_quantize(x, scale, zp, 0, 15, ste=ste)
    from zsq.quant.quantizer import quantize_to_int
    codes = quantize_to_int(x, scale, zp, 0, 15)
    assert torch.equal((codes.float() - zp) * scale, xq)
