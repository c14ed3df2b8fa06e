import pytest
import torch

from zsq.errors import ZsqError
from zsq.methods.registry import QuantJob
from zsq.ptq import cache
from zsq.ptq.budgets import Budget, EngineOptions, Phase, Recipe
from zsq.ptq.reconstruction_methods import genie, qdrop, brecq, adaround
from zsq.ptq.reconstruct import Reconstructor
from zsq.ptq.soft_round import SoftRoundQuantizer
from zsq.quant import UniformQuantizer, get_preset, quant_layers, quantize_model, set_quant_state

WEIGHTS_ONLY = Recipe("weights-only", "block", (
    Phase("w", train_rounding=True, learn_weight_scale=True, train_act_scale=False, acts_on=False,
          round_weight=0.01, lr_v=1e-2),
))


def _unit_error(qmodel, fp_ref, name, x):
    """MSE of the unit's output on the FP input, with weight quantization only."""
    xin, y = cache.capture(fp_ref, name, x, 64, want_output=True)
    with torch.no_grad():
        return float(((qmodel.get_submodule(name)(xin) - y) ** 2).mean())


def test_reconstruction_beats_nearest_rounding(tiny, tiny_images):
    cfg = get_preset("genie", "w2a8")
    nearest = quantize_model(tiny, cfg)
    set_quant_state(nearest, weights=True, acts=False)
    fp_ref = quantize_model(tiny, cfg)
    set_quant_state(fp_ref, weights=False, acts=False)
    err0 = _unit_error(nearest, fp_ref, "layer1.0", tiny_images)

    q = quantize_model(tiny, cfg)
    Reconstructor(q, tiny_images, WEIGHTS_ONLY, Budget("t", 120, 16, 48), EngineOptions()).run()
    set_quant_state(q, weights=True, acts=False)
    err1 = _unit_error(q, fp_ref, "layer1.0", tiny_images)
    assert err1 < 0.7 * err0
    # the result is a plain zsq fake-quant model: UniformQuantizers whose codes reproduce the weights
    for _, layer in quant_layers(q):
        wq = layer.weight_quant
        assert isinstance(wq, UniformQuantizer) and not isinstance(wq, SoftRoundQuantizer)
        s, z = wq.qparams(layer.weight)
        assert torch.allclose((wq.int_repr(layer.weight) - z) * s, layer.weight, atol=1e-6)


@pytest.mark.parametrize("method", [genie, qdrop, brecq, adaround])
def test_methods_run_and_report(tiny, tiny_images, method):
    preset = {"genie": "genie", "qdrop": "qdrop"}.get(method.__name__, "brecq")
    job = QuantJob(calib=tiny_images, iters=6, batch_size=16)
    res = method(tiny, get_preset(preset, "w4a4"), job)
    r = res.report
    phases = 2 if method in (brecq, adaround) else 1
    n_units = 6 if method is adaround else 4
    assert len(r["unit_losses"]) == phases * n_units == len(r["units"]) * phases
    assert r["quant_seconds"] > 0 and all(u["hard_loss"] >= 0 for u in r["unit_losses"])
    out = res.model(tiny_images[:4])
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert all(bool(q.initialized) and q.enabled for q in
               [m for m in res.model.modules() if isinstance(m, UniformQuantizer)])


def test_resume_after_interrupt_gives_same_model(tiny, tiny_images, tmp_path):
    cfg = get_preset("genie", "w4a4")
    budget = Budget("t", 8, 16, 48)
    from zsq.ptq.budgets import GENIE

    full = quantize_model(tiny, cfg)
    Reconstructor(full, tiny_images, GENIE, budget, EngineOptions(), work_dir=tmp_path / "a").run()

    def interrupt(k, rec):
        if k == 1:
            raise KeyboardInterrupt

    part = quantize_model(tiny, cfg)
    with pytest.raises(KeyboardInterrupt):
        Reconstructor(part, tiny_images, GENIE, budget, EngineOptions(), work_dir=tmp_path / "b",
                      on_unit_done=interrupt).run()
    resumed = quantize_model(tiny, cfg)
    report = Reconstructor(resumed, tiny_images, GENIE, budget, EngineOptions(),
                           work_dir=tmp_path / "b").run(resume=True)
    assert report["resumed_from"] == 2
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a checkpoint from another run is refused
    other = quantize_model(tiny, get_preset("genie", "w3a4"))
    with pytest.raises(ZsqError, match="different run"):
        Reconstructor(other, tiny_images, GENIE, budget, EngineOptions(),
                      work_dir=tmp_path / "b").run(resume=True)


def test_bad_inputs(tiny, tiny_images):
    cfg = get_preset("genie", "w4a4")
    with pytest.raises(ZsqError, match="needs calibration images"):
        genie(tiny, cfg, QuantJob(calib=None))
    with pytest.raises(ZsqError, match="expects"):
        genie(tiny, cfg, QuantJob(calib=torch.randn(8, 3, 32, 32)))
    with pytest.raises(ZsqError, match="dynamic"):
        genie(tiny, get_preset("gdfq", "w4a4"), QuantJob(calib=tiny_images))
    with pytest.raises(ZsqError, match="over the limit"):
        genie(tiny, cfg, QuantJob(calib=tiny_images, extra={"max_cache_mib": 0.0001}))
    with pytest.raises(ZsqError, match="--resume needs --out"):
        genie(tiny, cfg, QuantJob(calib=tiny_images, resume=True))
    with pytest.raises(ZsqError):
        get_preset("genie", "w1a4")
    with pytest.raises(ZsqError):
        Budget("x", 0, 32, 1024)


# ---- keep the better (held-out images decide whether a unit keeps its reconstruction) -----------------
BAD_LR = Recipe("bad-lr", "block", (
    Phase("w", train_rounding=True, learn_weight_scale=True, train_act_scale=False, acts_on=False,
          round_weight=0.01, lr_v=1e-2, lr_weight_scale=5.0),  # a step size lr that wrecks the grid
))


def _weights(q):
    return {n: l.weight_quant(l.weight).detach().clone() for n, l in quant_layers(q)}


def _nearest(tiny, cfg):
    q = quantize_model(tiny, cfg)
    set_quant_state(q, weights=True, acts=False)
    with torch.no_grad():
        q(torch.zeros(1, 3, 16, 16))  # initialises the weight grids (round to nearest)
    return _weights(q)


KEEP = EngineOptions(holdout=0.125, keep_better=True)


def test_worse_reconstruction_keeps_its_start(tiny, tiny_images):
    cfg = get_preset("genie", "w4a8")
    start = _nearest(tiny, cfg)
    q = quantize_model(tiny, cfg)
    rep = Reconstructor(q, tiny_images, BAD_LR, Budget("t", 10, 16, 48), KEEP).run()
    units = rep["unit_losses"]
    assert rep["budget"]["holdout_images"] == 6 and rep["budget"]["train_images"] == 42
    assert all(u["kept"] is False and u["holdout_end"] >= u["holdout_start"] for u in units), units
    assert len(rep["reverted_units"]) == len(units)
    after = _weights(q)
    for name, w in start.items():  # every unit is back at round-to-nearest on its initial grid
        assert torch.allclose(after[name], w, atol=1e-6), name
    # without the rule the same recipe keeps the damage
    q2 = quantize_model(tiny, cfg)
    rep2 = Reconstructor(q2, tiny_images, BAD_LR, Budget("t", 10, 16, 48),
                         EngineOptions(keep_better=False)).run()
    assert all(u["kept"] is None for u in rep2["unit_losses"]) and not rep2["reverted_units"]
    assert any(not torch.allclose(_weights(q2)[n], w, atol=1e-6) for n, w in start.items())


def test_better_reconstruction_is_kept(tiny, tiny_images):
    q = quantize_model(tiny, get_preset("genie", "w2a8"))
    rep = Reconstructor(q, tiny_images, WEIGHTS_ONLY, Budget("t", 40, 16, 48), KEEP).run()
    kept = [u for u in rep["unit_losses"] if u["kept"]]
    assert kept and all(u["holdout_end"] < u["holdout_start"] for u in kept)
    assert all(u["holdout_end"] >= u["holdout_start"] for u in rep["unit_losses"] if u["kept"] is False)


def test_holdout_split_is_seeded_and_disjoint(tiny_images):
    from zsq.ptq.reconstruct import _split_holdout

    a, n = _split_holdout(tiny_images, 0.125, seed=3)
    b, _ = _split_holdout(tiny_images, 0.125, seed=3)
    c, _ = _split_holdout(tiny_images, 0.125, seed=4)
    assert n == 42 and torch.equal(a, b) and not torch.equal(a[n:], c[n:])
    rows = {tuple(r.flatten()[:4].tolist()) for r in tiny_images}
    assert {tuple(r.flatten()[:4].tolist()) for r in a} == rows  # a reordering: nothing lost, nothing doubled
    same, m = _split_holdout(tiny_images, 0.0, seed=3)
    assert m == 48 and torch.equal(same, tiny_images)
    with pytest.raises(ZsqError, match="none to train on"):
        _split_holdout(tiny_images[:1], 0.5, seed=0)


def test_keep_better_options(tiny, tiny_images):
    cfg = get_preset("genie", "w4a4")
    with pytest.raises(ZsqError, match="holdout > 0"):
        EngineOptions(holdout=0.0, keep_better=True)
    assert EngineOptions().holdout == 0.0 and not EngineOptions().keep_better  # opt-in until measured
    with pytest.raises(ZsqError, match="holdout must be in"):
        EngineOptions(holdout=1.0)
    with pytest.raises(ZsqError, match="keep_better"):
        genie(tiny, cfg, QuantJob(calib=tiny_images, iters=2, extra={"keep_better": "maybe"}))
    r = genie(tiny, cfg, QuantJob(calib=tiny_images, iters=2,
                                  extra={"holdout": 0, "keep_better": False})).report
    assert r["budget"]["holdout_images"] == 0 and all(u["holdout_start"] is None for u in r["unit_losses"])


def test_ptq_options_default_to_the_engines_own():
    from dataclasses import fields

    from zsq.ptq.budgets import EngineOptions
    from zsq.ptq.reconstruction_methods import PTQOptions

    user, engine = PTQOptions(), EngineOptions()
    shared = [f.name for f in fields(PTQOptions) if hasattr(engine, f.name)]
    assert shared == ["chunk", "max_cache_mib", "holdout", "keep_better", "augment", "refit_iters", "refit_affine",
                      "rounding", "gptq_damp", "gptq_target", "hardening", "init_rounding"]
    # rounding is the budget's unless asked (Budget.rounding), hardening default_hardening's, every other
    # one the engine's own
    assert user.rounding is None and user.hardening is None
    assert all(getattr(user, n) == getattr(engine, n) for n in shared if n not in ("rounding", "hardening"))


def test_soft_loss_is_measured_before_hardening(tiny, tiny_images):
    """soft_loss is the unit's error with the soft bits as trained, hard_loss the same after hardening:
    after one step at a negligible lr the soft bits still reproduce the float weights within the grid, so
    the first unit's soft error (its input is the float image, activations off) is far below its hardened,
    round-to-nearest W2 error."""
    one_step = Recipe("one-step", "block", (
        Phase("w", train_rounding=True, learn_weight_scale=False, train_act_scale=False, acts_on=False,
              round_weight=0.0, lr_v=1e-12),
    ))
    q = quantize_model(tiny, get_preset("brecq", "w2a8"))
    rep = Reconstructor(q, tiny_images, one_step, Budget("t", 1, 16, 48), EngineOptions(holdout=0)).run()
    first = rep["unit_losses"][0]
    assert first["soft_loss"] is not None and first["hard_loss"] > 0
    assert first["soft_loss"] < 0.2 * first["hard_loss"]
    assert all(u["soft_loss"] is not None for u in rep["unit_losses"])


def test_refit_after_hardening_lowers_the_hardened_error(tiny, tiny_images):
    """refit_iters re-fits a unit's steps (and with refit_affine its BN affine terms and biases) to its
    hardened rounding: summed over units the hardened error after it is below the one before it."""
    q = quantize_model(tiny, get_preset("genie", "w2a8"))
    opts = EngineOptions(refit_iters=30, refit_affine=True)
    rep = Reconstructor(q, tiny_images, WEIGHTS_ONLY, Budget("t", 20, 16, 48), opts).run()
    units = [u for u in rep["unit_losses"] if u["refit_from"] is not None]
    assert len(units) == len(rep["unit_losses"])
    assert sum(u["hard_loss"] for u in units) < 0.95 * sum(u["refit_from"] for u in units)
    plain = Reconstructor(quantize_model(tiny, get_preset("genie", "w2a8")), tiny_images, WEIGHTS_ONLY,
                          Budget("t", 20, 16, 48), EngineOptions()).run()
    assert all(u["refit_from"] is None for u in plain["unit_losses"])


def test_gptq_hardening_is_never_worse_than_nearest_on_the_training_images(tiny, tiny_images):
    """hardening=gptq: each unit's trained soft weights are rounded by GPTQ on its quantized input, and the unit
    keeps that only where its error on its images is below 1[V >= 0]'s. Per unit the kept error is the lower of
    the two; over the run GPTQ wins somewhere (20 steps leave the W2 soft bits far from 0 and 1) and the
    hardened error is the reported one. The weights end on their grid as frozen UniformQuantizers."""
    q = quantize_model(tiny, get_preset("genie", "w2a4"))
    rep = Reconstructor(q, tiny_images, WEIGHTS_ONLY, Budget("t", 20, 16, 48), EngineOptions(hardening="gptq")).run()
    units = rep["unit_losses"]
    assert all("hardening" in u for u in units)
    for u in units:
        h = u["hardening"]
        assert h["kept"] == ("gptq" if h["gptq"] < h["nearest"] else "nearest")
        assert u["hard_loss"] == pytest.approx(min(h["gptq"], h["nearest"]), rel=1e-4, abs=1e-7)
    assert any(u["hardening"]["kept"] == "gptq" for u in units)
    assert sum(u["hard_loss"] for u in units) < sum(u["hardening"]["nearest"] for u in units)
    for _, layer in quant_layers(q):
        wq = layer.weight_quant
        assert isinstance(wq, UniformQuantizer)
        assert torch.equal(wq(layer.weight), layer.weight)  # the codes are on the grid the quantizer holds
    plain = Reconstructor(quantize_model(tiny, get_preset("genie", "w2a4")), tiny_images, WEIGHTS_ONLY,
                          Budget("t", 20, 16, 48), EngineOptions()).run()
    assert all("hardening" not in u for u in plain["unit_losses"])
    # the first unit sees the same input in both runs: the plain run's hardened error is the "nearest" one
    assert plain["unit_losses"][0]["hard_loss"] == pytest.approx(units[0]["hardening"]["nearest"], rel=1e-4)


def test_hardening_options_are_checked():
    with pytest.raises(ZsqError, match="hardening must be one of"):
        EngineOptions(hardening="stochastic")
    with pytest.raises(ZsqError, match="rounding=gptq learns none"):
        EngineOptions(hardening="gptq", rounding="gptq")
    with pytest.raises(ZsqError, match="set refit_iters=0"):
        EngineOptions(hardening="gptq", refit_iters=5)


def test_refit_options_are_checked():
    with pytest.raises(ZsqError, match="refit_iters must be >= 0"):
        EngineOptions(refit_iters=-1)
    with pytest.raises(ZsqError, match="set refit_iters > 0 too"):
        EngineOptions(refit_affine=True)



def test_a_step_adam_pushes_through_zero_is_held_positive():
    """One Adam step moves a parameter by about lr whatever its size: a 1e-3 step with lr 1 would end at -0.999,
    a mirrored grid (and a checkpoint the loader refuses). The engine's update holds steps at MIN_STEP or more."""
    from zsq.ptq.reconstruct import MIN_STEP, _step

    step = torch.nn.Parameter(torch.tensor([1e-3, 0.5]))
    soft = torch.nn.Parameter(torch.tensor([0.3]))
    opt_s, opt_v = torch.optim.Adam([step], lr=1.0), torch.optim.Adam([soft], lr=1.0)
    _step([opt_v, opt_s], step.sum() + soft.sum())  # gradient +1: Adam moves both by -1
    assert step.detach().tolist() == pytest.approx([MIN_STEP, MIN_STEP], rel=1e-6)  # float32 of 1e-8
    assert float(soft) == pytest.approx(-0.7)  # soft bits are not steps: left where Adam put them
