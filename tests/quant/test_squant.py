"""SQuant rounding: the vectorised flips against a plain per-group loop, the CASE invariants, its objective
lowered on every layer, codes on the grid, and the squant method's refusals."""
import pytest
import torch
import torch.nn as nn

import zsq
from zsq.errors import ZsqError
from zsq.methods import QuantJob, get_method
from zsq.quant import quant_layers
from zsq.quant.squant import objective, squant_codes
from tests.tiny_models import TINY_META, tiny_factory, tiny_images
from zsq.models.meta import set_meta


def _reference(x, lo, hi, mode):
    """SQuant written as the spec's loops, one group at a time (with zsq's documented deviations)."""
    x = x.double()
    m, n, k = x.shape
    r = torch.minimum(torch.maximum(torch.round(x), lo.double()), hi.double())
    e = r - x
    up = torch.where((e < 0) & (r < hi), -e, torch.zeros_like(e))
    down = torch.where((e > 0) & (r > lo), e, torch.zeros_like(e))

    def flip(r, e, up, down):  # [G, L]
        nu, nd = torch.zeros_like(up), torch.zeros_like(down)
        for g in range(r.shape[0]):
            total = float(e[g].sum())
            go_up = total < 0
            kk = min(int(torch.round(torch.tensor(abs(total)))), r.shape[1])
            prio = (up if go_up else down)[g]
            order = sorted(range(r.shape[1]), key=lambda i: -float(prio[i]))  # stable
            for i in order[:kk]:
                if prio[i] > 0:
                    r[g, i] += 1 if go_up else -1
                    e[g, i] += 1 if go_up else -1
            over = kk >= abs(total) and kk > 0
            j = order[kk - 1] if over else (order[kk] if kk < r.shape[1] else None)
            if j is None or prio[j] <= 0:
                continue
            same = not over
            target = nu if (go_up == same) else nd
            target[g, j] = abs(float(e[g, j]))
        return r, e, nu, nd

    if mode == "squant-e":
        return r
    if mode in ("squant", "squant-k") and k > 1:
        r, e, up, down = (t.reshape(m, n, k) for t in flip(*(t.reshape(m * n, k) for t in (r, e, up, down))))
    if mode in ("squant", "squant-c"):
        r, e, up, down = (t.reshape(m, n, k) for t in flip(*(t.reshape(m, n * k) for t in (r, e, up, down))))
    return r


def _grid_values(m, n, k, seed, spread=6.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, k, generator=g, dtype=torch.float64) * spread
    return x, torch.full((m, 1, 1), -8.0, dtype=torch.float64), torch.full((m, 1, 1), 7.0, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["squant", "squant-e", "squant-k", "squant-c"])
@pytest.mark.parametrize("shape", [(6, 5, 9), (4, 1, 25), (5, 7, 1)])
def test_vectorised_flips_equal_the_loop(mode, shape):
    x, lo, hi = _grid_values(*shape, seed=sum(shape))
    x = x.clamp(-8.45, 7.45)  # some elements at the grid's ends: they may not move outwards
    got, _ = squant_codes(x, lo, hi, mode)
    assert torch.equal(got, _reference(x, lo, hi, mode))


def test_case_invariants_and_grid():
    x, lo, hi = _grid_values(16, 12, 9, seed=3, spread=2.0)  # well inside the grid: no clamping
    nearest, _ = squant_codes(x, lo, hi, "squant-e")
    assert torch.equal(nearest, torch.round(x))
    rk, _ = squant_codes(x, lo, hi, "squant-k")
    assert (rk - x).sum(2).abs().max() <= 0.5 + 1e-9  # every kernel after K
    r, st = squant_codes(x, lo, hi, "squant")
    err = r - x
    assert err.sum((1, 2)).abs().max() <= 0.5 + 1e-9  # every channel after C
    assert err.sum(2).abs().max() <= 1.0 + 1e-9  # a kernel moves at most once more in C
    assert (err.abs() < 1).all()  # floor or ceil of each value
    assert torch.equal(r, torch.round(r)) and r.min() >= -8 and r.max() <= 7
    assert st.kernel_flips > 0 and st.channel_flips > 0
    assert st.objective_squant < st.objective_nearest
    assert objective(err) == pytest.approx(st.objective_squant)
    again, _ = squant_codes(x.clone(), lo, hi, "squant")
    assert torch.equal(r, again)  # no data, no randomness


def test_one_by_one_layer_runs_only_the_channel_stage():
    x, lo, hi = _grid_values(6, 20, 1, seed=5, spread=2.0)
    assert torch.equal(squant_codes(x, lo, hi, "squant")[0], squant_codes(x, lo, hi, "squant-c")[0])
    assert torch.equal(squant_codes(x, lo, hi, "squant-k")[0], torch.round(x))


def _rtn_and_squant(preset, bits="w4a4", **opts):
    m = tiny_factory()
    job = lambda extra: QuantJob(extra=extra)  # noqa: E731
    q_sq = get_method("squant").fn(m, zsq.get_preset(preset, bits), job(dict(opts)))
    q_rtn = get_method("squant").fn(m, zsq.get_preset(preset, bits), job(dict(opts, mode="squant-e")))
    return m, q_sq, q_rtn


@pytest.mark.parametrize("preset", ["genie", "gdfq", "deploy"])
def test_squant_lowers_its_objective_on_every_layer_and_stays_on_the_grid(preset):
    m, q_sq, q_rtn = _rtn_and_squant(preset)
    fp = dict(m.named_modules())
    rtn_layers = dict(quant_layers(q_rtn.model))
    flipped = 0
    for name, layer in quant_layers(q_sq.model):
        wq = layer.weight_quant
        assert not wq.spec.dynamic  # gdfq's dynamic grid became the same static one
        assert torch.equal(wq(layer.weight), layer.weight)  # written on the grid: quantizing again changes nothing
        codes = wq.int_repr(layer.weight)
        assert codes.min() >= wq.qmin and codes.max() <= wq.qmax
        rep = q_sq.report["squant_layers"][name]
        assert rep["objective_squant"] <= rep["objective_nearest"] + 1e-9, name
        flipped += rep["kernel_flips"] + rep["channel_flips"] > 0
        if preset == "deploy":
            continue  # BN folded into the weights: the float weight is not the model's; the report is checked above
        # the objective recomputed here from the float weight and the two models' weights, in grid units
        s = wq.qparams(layer.weight)[0]
        x = (fp[name].weight.detach() / s).double()
        shape = lambda t: t.reshape(t.shape[0], t.shape[1], -1)  # noqa: E731
        err_sq, err_rtn = shape((layer.weight / s).double() - x), shape((rtn_layers[name].weight / s).double() - x)
        assert (err_sq.abs() < 1 + 1e-4).all()  # each weight is its floor or ceil
        before, after = objective(err_rtn), objective(err_sq)
        if rep["kernel_flips"] + rep["channel_flips"]:
            assert after < before, name
        else:
            assert after == pytest.approx(before), name
    assert flipped >= 3


def test_squant_e_is_bn_minmax_bit_for_bit():
    m = tiny_factory()
    cfg = zsq.get_preset("genie", "w4a4")
    a = get_method("squant").fn(m, cfg, QuantJob(extra={"mode": "squant-e"})).model
    b = get_method("bn-minmax").fn(m, cfg, QuantJob()).model
    x = tiny_images(8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_squant_leaves_the_float_model_alone():
    m = tiny_factory()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    get_method("squant").fn(m, zsq.get_preset("gdfq", "w4a4"), QuantJob(extra={"equalize": True, "bias_correct": True}))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _no_bn_model():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    return set_meta(m.eval(), TINY_META)


@pytest.mark.parametrize("method", ["squant", "dfq"])
def test_refuses_models_without_batchnorm_in_one_line(method):
    with pytest.raises(ZsqError) as e:
        get_method(method).fn(_no_bn_model(), zsq.get_preset("genie", "w4a4"), QuantJob())
    assert "needs BatchNorm" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("opts, match", [({"mode": "squant-x"}, "mode"), ({"bn_k": 0}, "bn_k"),
                                         ({"iterations": 0}, "iterations"), ({"relu6": "gelu"}, "relu6"),
                                         ({"equalize": "yes"}, "equalize")])
def test_options_are_typed_and_bounded(opts, match):
    with pytest.raises(ZsqError, match=match):
        get_method("squant").parse_options(opts, TINY_META, "quick")
