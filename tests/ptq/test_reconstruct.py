import pytest
import torch

from zsq.errors import ZsqError
from zsq.methods.registry import QuantJob
from zsq.ptq import cache
from zsq.ptq.budgets import Budget, EngineOptions, Phase, Recipe
from zsq.ptq.methods import genie, qdrop, brecq, adaround
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
    Reconstructor(q, tiny_images, WEIGHTS_ONLY, Budget("t", 120, 16, 48), EngineOptions(quiet=True)).run()
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
    job = QuantJob(calib=tiny_images, iters=6, batch_size=16, quiet=True)
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
    Reconstructor(full, tiny_images, GENIE, budget, EngineOptions(quiet=True), work_dir=tmp_path / "a").run()

    def interrupt(k, rec):
        if k == 1:
            raise KeyboardInterrupt

    part = quantize_model(tiny, cfg)
    with pytest.raises(KeyboardInterrupt):
        Reconstructor(part, tiny_images, GENIE, budget, EngineOptions(quiet=True), work_dir=tmp_path / "b",
                      on_unit_done=interrupt).run()
    resumed = quantize_model(tiny, cfg)
    report = Reconstructor(resumed, tiny_images, GENIE, budget, EngineOptions(quiet=True),
                           work_dir=tmp_path / "b").run(resume=True)
    assert report["resumed_from"] == 2
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a checkpoint from another run is refused
    other = quantize_model(tiny, get_preset("genie", "w3a4"))
    with pytest.raises(ZsqError, match="different run"):
        Reconstructor(other, tiny_images, GENIE, budget, EngineOptions(quiet=True),
                      work_dir=tmp_path / "b").run(resume=True)


def test_bad_inputs(tiny, tiny_images):
    cfg = get_preset("genie", "w4a4")
    with pytest.raises(ZsqError, match="needs calibration images"):
        genie(tiny, cfg, QuantJob(calib=None, quiet=True))
    with pytest.raises(ZsqError, match="expects"):
        genie(tiny, cfg, QuantJob(calib=torch.randn(8, 3, 32, 32), quiet=True))
    with pytest.raises(ZsqError, match="dynamic"):
        genie(tiny, get_preset("gdfq", "w4a4"), QuantJob(calib=tiny_images, quiet=True))
    with pytest.raises(ZsqError, match="over the limit"):
        genie(tiny, cfg, QuantJob(calib=tiny_images, quiet=True, extra={"max_cache_mib": 0.0001}))
    with pytest.raises(ZsqError, match="--resume needs --out"):
        genie(tiny, cfg, QuantJob(calib=tiny_images, quiet=True, resume=True))
    with pytest.raises(ZsqError):
        get_preset("genie", "w1a4")
    with pytest.raises(ZsqError):
        Budget("x", 0, 32, 1024)
