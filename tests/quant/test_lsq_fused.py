"""The fused LSQ fake-quant (zsq.quant.quantizer.LSQFakeQuant) against the unfused autograd formula it
replaces: forward values and both gradients equal bit for bit, on random tensors with values on rounding
ties, exactly on the clamp bounds (where autograd's clamp halves the gradient) and outside the range."""
import pytest
import torch

from zsq.quant.quantizer import LSQFakeQuant, fake_quantize, round_ste


def _unfused(x, s, z, qmin, qmax):
    lo, hi = qmin - z, qmax - z
    return round_ste(torch.clamp(x / s, lo, hi)) * s


def _case(seed: int, per_channel: bool, qmin: int, qmax: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, 5, 5, generator=g) * 4
    if per_channel:
        s = torch.rand(4, 1, 1, generator=g) * 0.5 + 0.1
        z = torch.randint(0, 4, (4, 1, 1), generator=g).float() if qmin == 0 else torch.zeros(4, 1, 1)
    else:
        s, z = torch.tensor(0.25), torch.tensor(3.0 if qmin == 0 else 0.0)  # x / s exact on the bounds
    s0, z0 = s.flatten()[0], z.flatten()[0]
    x[0, 0, 0, :3] = torch.tensor([0.5, 1.5, -2.5]) * s0  # ties of round()
    x[0, 0, 1, 0] = (qmax - z0) * s0  # exactly on the upper bound
    x[0, 0, 1, 1] = (qmin - z0) * s0  # exactly on the lower bound
    x[0, 0, 1, 2] = 0.0
    return x, s, z, torch.randn(x.shape, generator=g)


def _run(fn, x0, s0, z, g, qmin, qmax):
    x, s = x0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
    y = fn(x, s, z, qmin, qmax)
    y.backward(g)
    return y.detach(), x.grad, s.grad


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("grid", [(0, 15), (-8, 7), (0, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_lsq_equals_autograd_formula_bit_for_bit(per_channel, grid, seed):
    x, s, z, g = _case(seed, per_channel, *grid)
    ref = _run(_unfused, x, s, z, g, *grid)
    new = _run(fake_quantize, x, s, z, g, *grid)
    for name, a, b in zip(("values", "grad x", "grad step"), ref, new):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max()}"
    if not per_channel:  # on a bound (where a plain 0/1 mask would be wrong) autograd passes half the gradient
        assert float(ref[1][0, 0, 1, 0]) == float(g[0, 0, 1, 0]) * 0.5
        assert float(ref[1][0, 0, 1, 1]) == float(g[0, 0, 1, 1]) * 0.5


def test_fused_lsq_is_used_when_the_step_learns_and_skipped_without_grad():
    x, s, z = torch.randn(8), torch.tensor(0.2, requires_grad=True), torch.tensor(0.0)
    y = fake_quantize(x, s, z, -8, 7)
    assert y.grad_fn is not None and "LSQFakeQuant" in type(y.grad_fn).__name__
    with torch.no_grad():
        y0 = fake_quantize(x, s, z, -8, 7)
    assert y0.grad_fn is None and torch.equal(y0, y.detach())
    # input gradient only (a frozen step): no step gradient is computed
    xr = x.clone().requires_grad_(True)
    out = LSQFakeQuant.apply(xr, s.detach(), torch.tensor(-8.0), torch.tensor(7.0))
    out.sum().backward()
    inside = ((x / 0.2) > -8) & ((x / 0.2) < 7)
    assert torch.equal(xr.grad != 0, inside) and torch.allclose(xr.grad[inside], torch.ones(int(inside.sum())))
