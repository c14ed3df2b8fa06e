"""--set learn_weight_scale / train_act_scale / lr_*: change what a recipe learns, only where it makes
sense, and really reach the engine (a frozen weight step stays at its start)."""
import pytest
import torch

import zsq.ptq.reconstruction_methods as rm
from tests.tiny_models import make_tiny
from zsq.errors import ZsqError
from zsq.methods.registry import QuantJob
from zsq.options import parse_options
from zsq.ptq.budgets import RECIPES
from zsq.quant import get_preset


def _recipe(name, w_bits=4, **values):
    return rm.with_overrides(RECIPES[name], parse_options(rm.PTQOptions, values, name), w_bits)


def test_overrides_apply_to_the_phases_they_fit():
    g = _recipe("genie", learn_weight_scale=False, lr_act_scale=1e-5)
    (ph,) = g.phases
    assert ph.learn_weight_scale is False and ph.lr_act_scale == 1e-5 and ph.lr_v == RECIPES["genie"].phases[0].lr_v
    b = _recipe("brecq", lr_weight_scale=3e-3, lr_act_scale=2e-3)
    weights, acts = b.phases
    assert weights.lr_weight_scale == 3e-3 and acts.lr_act_scale == 2e-3
    assert weights.lr_act_scale == RECIPES["brecq"].phases[0].lr_act_scale  # activations off there: unchanged
    assert acts.lr_weight_scale == RECIPES["brecq"].phases[1].lr_weight_scale  # learns no rounding: unchanged
    assert _recipe("genie") == RECIPES["genie"]


def test_lr_v_reaches_only_phases_that_learn_rounding():
    b = _recipe("brecq", lr_v=3e-2)
    weights, acts = b.phases
    assert weights.train_rounding and weights.lr_v == 3e-2
    assert acts.lr_v == RECIPES["brecq"].phases[1].lr_v  # learns no rounding: unchanged
    assert _recipe("genie", lr_v=1e-2).phases[0].lr_v == 1e-2 != RECIPES["genie"].phases[0].lr_v


@pytest.mark.parametrize("iters,lr", [(20000, 1e-3), (3000, 1e-3), (1000, 3e-3), (300, 1e-2), (100, 3e-2),
                                     (50, 5e-2), (5, 5e-2)])
def test_soft_bit_lr_is_sized_to_the_budget(iters, lr):
    """AdaRound's 1e-3 from 3,000 steps up (the paper's 20k); 3 / steps below that, capped at 5e-2."""
    for name in ("genie", "brecq"):
        phases = rm.with_overrides(RECIPES[name], rm.PTQOptions(), 4, iters).phases
        assert phases[0].lr_v == pytest.approx(lr), (name, iters)
    assert rm.with_overrides(RECIPES["genie"], rm.PTQOptions(lr_v=2e-3), 4, 300).phases[0].lr_v == 2e-3


def test_the_budget_reaches_the_soft_bits_optimizer(monkeypatch):
    import zsq.ptq.reconstruct as rc

    seen = []
    groups = rc._param_groups
    monkeypatch.setattr(rc, "_param_groups", lambda ph, soft, acts: seen.append(ph.lr_v) or groups(ph, soft, acts))
    _run({})  # 5 steps per unit
    assert seen and set(seen) == {5e-2}
    seen.clear()
    _run({"lr_v": 3e-3})
    assert seen and set(seen) == {3e-3}


def test_an_override_that_leaves_a_phase_nothing_to_learn_is_refused():
    with pytest.raises(ZsqError, match="learns nothing"):
        _recipe("brecq", train_act_scale=False)  # BRECQ's second phase learns only activation steps


@pytest.mark.parametrize("key,value,msg", [("lr_act_scale", 0.0, "lr_act_scale must be > 0"),
                                           ("lr_v", -1e-3, "lr_v must be > 0"),
                                           ("learn_weight_scale", "no", "learn_weight_scale must be bool")])
def test_bad_values_are_one_line_errors(key, value, msg):
    with pytest.raises(ZsqError, match=msg):
        parse_options(rm.PTQOptions, {key: value}, "genie")


def _weight_steps(model):
    return {n: m.weight_quant.scale.detach().clone() for n, m in model.named_modules()
            if hasattr(m, "weight_quant") and getattr(m.weight_quant, "scale", None) is not None}


def _run(extra, bits="w4a4"):
    calib = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fast = {} if "lr_weight_scale_rel" in extra else {"lr_weight_scale": 1e-2}
    job = QuantJob(calib=calib, iters=5, batch_size=8, extra=dict(fast, **extra))
    return rm.genie(make_tiny(), get_preset("genie", bits), job).model


def test_frozen_weight_step_reaches_the_engine():
    learned, frozen = _weight_steps(_run({})), _weight_steps(_run({"learn_weight_scale": False}))
    start = _weight_steps(_run({"learn_weight_scale": False, "lr_weight_scale": 1.0}))  # an lr, but nothing learned
    assert learned.keys() == frozen.keys() and learned
    assert any(not torch.equal(learned[n], frozen[n]) for n in learned)  # Genie-M moved its steps
    for n in frozen:  # frozen: the initial grid, whatever the (unused) learning rate
        assert torch.equal(frozen[n], start[n]), n


def test_relative_weight_step_lr_needs_a_learned_step():
    g = _recipe("genie", lr_weight_scale_rel=5e-3)
    assert g.phases[0].lr_weight_scale_rel == 5e-3
    with pytest.raises(ZsqError, match="lr_weight_scale_rel needs learn_weight_scale"):
        _recipe("qdrop", lr_weight_scale_rel=5e-3)  # QDrop keeps its weight steps fixed
    with pytest.raises(ZsqError, match="lr_weight_scale_rel needs learn_weight_scale"):
        _recipe("genie", w_bits=8, lr_weight_scale_rel=5e-3)  # fixed on a fine grid: refused, not ignored
    assert _recipe("genie", w_bits=8, learn_weight_scale=True, lr_weight_scale_rel=5e-3).phases[0].lr_weight_scale_rel == 5e-3


def test_relative_weight_step_reaches_the_engine():
    rel = _weight_steps(_run({"lr_weight_scale_rel": 1e-3}))
    start = _weight_steps(_run({"learn_weight_scale": False}))
    for n in rel:  # 5 Adam steps of 1e-3 move each step by at most ~0.5 % of itself
        ratio = rel[n] / start[n]
        assert (ratio - 1).abs().max() <= 5.5e-3 and not torch.equal(rel[n], start[n]), n


def _act_steps(model):
    from zsq.quant import act_quantizers
    return {n: q.scale.detach().clone() for n, q in act_quantizers(model) if isinstance(q.scale, torch.nn.Parameter)}


def test_relative_activation_step_lr_is_a_share_of_each_step():
    """Two steps 100x apart get Adam lrs 100x apart (one absolute lr would freeze one or swing the other)."""
    from zsq.ptq.reconstruct import _param_groups
    from zsq.quant import QuantSpec, UniformQuantizer

    acts = []
    for s0 in (0.03, 3.0):
        q = UniformQuantizer(QuantSpec(bits=4, per_channel=False, symmetric=True, learnable=True))
        q.set_range(torch.tensor(-8 * s0), torch.tensor(7 * s0))
        acts.append(q)
    starts = [float(q.scale) for q in acts]
    phase = _recipe("genie", lr_act_scale_rel=2e-2).phases[0]
    _, groups = _param_groups(phase, [], acts)
    assert [g["lr"] for g in groups] == pytest.approx([2e-2 * s for s in starts])
    _, groups = _param_groups(_recipe("genie").phases[0], [], acts)  # the default: one absolute lr for all
    assert len(groups) == 1 and groups[0]["lr"] == RECIPES["genie"].phases[0].lr_act_scale


def test_relative_activation_step_lr_reaches_the_engine():
    rel = _act_steps(_run({"lr_act_scale_rel": 1e-2}))
    default = _act_steps(_run({}))  # the absolute 4e-5: a run without the option is bit-identical to it
    assert rel.keys() == default.keys() and rel
    assert any(not torch.equal(rel[n], default[n]) for n in rel)


def test_relative_activation_step_lr_is_refused_where_nothing_learns_it():
    with pytest.raises(ZsqError, match="not both"):
        parse_options(rm.PTQOptions, {"lr_act_scale": 1e-4, "lr_act_scale_rel": 1e-2}, "genie")
    with pytest.raises(ZsqError, match="lr_act_scale_rel needs train_act_scale"):
        _recipe("genie", train_act_scale=False, lr_act_scale_rel=1e-2)
    with pytest.raises(ZsqError, match="lr_act_scale_rel must be > 0"):
        parse_options(rm.PTQOptions, {"lr_act_scale_rel": 0.0}, "genie")


@pytest.mark.parametrize("bits", ["w8a8", "w5a5"])
def test_genie_keeps_weight_steps_on_fine_grids_unless_asked(bits):
    frozen = _weight_steps(_run({"learn_weight_scale": False}, bits))
    auto = _weight_steps(_run({}, bits))
    asked = _weight_steps(_run({"learn_weight_scale": True}, bits))
    assert auto.keys() == frozen.keys() == asked.keys() and auto
    assert all(torch.equal(auto[n], frozen[n]) for n in auto)
    assert any(not torch.equal(asked[n], frozen[n]) for n in asked)


def test_genie_learns_weight_steps_at_four_bits_and_below():
    assert rm.FIXED_WEIGHT_STEP_BITS > 4
    auto, frozen = _weight_steps(_run({}, "w4a8")), _weight_steps(_run({"learn_weight_scale": False}, "w4a8"))
    assert any(not torch.equal(auto[n], frozen[n]) for n in auto)


def test_absolute_and_relative_lr_are_exclusive():
    with pytest.raises(ZsqError, match="not both"):
        parse_options(rm.PTQOptions, {"lr_weight_scale": 1e-4, "lr_weight_scale_rel": 1e-2}, "genie")
    paper = _recipe("genie", lr_weight_scale=1e-4).phases[0]  # an absolute lr selects the paper's parametrisation
    assert paper.lr_weight_scale == 1e-4 and paper.lr_weight_scale_rel is None and paper.learn_weight_scale
    off = _recipe("genie", learn_weight_scale=False).phases[0]
    assert not off.learn_weight_scale and off.lr_weight_scale_rel is None


def test_round_weight_and_qdrop_p_reach_the_phases_they_fit():
    g = _recipe("genie", round_weight=10.0, qdrop_p=1.0).phases[0]
    assert g.round_weight == 10.0 and g.qdrop_p == 1.0
    weights, acts = _recipe("brecq", round_weight=0.1).phases
    assert weights.round_weight == 0.1 and acts.round_weight == RECIPES["brecq"].phases[1].round_weight
    assert _recipe("qdrop", qdrop_p=0.75).phases[0].qdrop_p == 0.75


@pytest.mark.parametrize("name,values,msg", [
    ("brecq", {"qdrop_p": 0.5}, "brecq does not use QDrop"),
    ("genie", {"qdrop_p": 0.0}, "qdrop_p must be > 0.0"),
    ("genie", {"qdrop_p": 1.5}, "qdrop_p must be .*<= 1.0"),
    ("genie", {"round_weight": -1.0}, "round_weight must be >= 0.0"),
])
def test_round_weight_and_qdrop_p_refuse_what_they_cannot_do(name, values, msg):
    with pytest.raises(ZsqError, match=msg):
        _recipe(name, **values)


def test_qdrop_p_one_reads_only_the_quantized_input(monkeypatch):
    import zsq.ptq.reconstruct as rc

    seen = []
    hooks = rc._qdrop_hooks
    monkeypatch.setattr(rc, "_qdrop_hooks", lambda q, p, g, rows: seen.append(p) or hooks(q, p, g, rows))
    _run({"qdrop_p": 1.0})
    assert seen and set(seen) == {1.0}
