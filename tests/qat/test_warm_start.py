"""QAT warm start: the loop fine-tunes a reconstructed student on the preset's fixed-grid form."""
import pytest
import torch

from tests.qat.test_loop import _eval, _teacher
from zsq.errors import ZsqError
from zsq.methods.registry import METHODS, QuantJob
from zsq.qat.loop import distill
from zsq.qat.training_config import method_config
from zsq.quant import get_preset
from zsq.quant.qconfig import fixed_grids
from zsq.quant.quantizer import UniformQuantizer


def _job(**extra):
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    return QuantJob(calib=images, calib_source="synthetic:genie", epochs=2, iters_per_epoch=2, batch_size=4,
                    eval_fn=_eval, extra=dict(dict(lr=1e-2, warm_start="genie", warm_iters=3), **extra))


def test_fixed_grids_keep_the_protocol_and_fix_the_grids():
    g = get_preset("gdfq", "w3a3")
    f = get_preset("gdfq-fixed", "w3a3")
    assert f == fixed_grids(g, "gdfq-fixed")
    # same question: which layers, bits, placement, granularity, symmetry
    for k in ("w_bits", "a_bits", "act_placement", "quantize_residual", "overrides", "fold_bn"):
        assert getattr(f, k) == getattr(g, k)
    assert (f.weight.per_channel, f.weight.symmetric, f.act.per_channel, f.act.symmetric) == (True, False, False, False)
    assert g.weight.dynamic and not f.weight.dynamic
    assert f.act.learnable and not g.act.learnable and f.act.ste == "clip"


@pytest.mark.parametrize("method", ["ait", "hast"])
def test_warm_start_reconstructs_then_trains_without_calibration(method):
    res = METHODS.get(method).fn(_teacher(), get_preset("gdfq", "w4a4"), _job())
    rep = res.report
    assert rep["warm_start"]["method"] == "genie" and rep["warm_start"]["preset"] == "gdfq-fixed@v1 w4a4"
    assert rep["preset"] == "gdfq-fixed@v1 w4a4"
    assert 0.0 <= rep["warm_start"]["top1"] <= 100.0
    assert rep["config"]["warmup_epochs"] == 0 and rep["config"]["live_range_epochs"] == 0
    assert all(h["trained"] for h in rep["epochs"])  # no calibration epoch: the student trains from epoch 0
    weight_quants = [m for n, m in res.model.named_modules() if isinstance(m, UniformQuantizer) and m.spec.per_channel]
    assert weight_quants and not any(q.spec.dynamic for q in weight_quants)


def test_the_loop_starts_from_the_given_student():
    """With a step too small to move anything the loop returns its start, not a fresh min/max student."""
    teacher = _teacher()
    res = METHODS.get("genie").fn(teacher, get_preset("gdfq-fixed", "w4a4"),
                                  QuantJob(calib=torch.randn(16, 3, 8, 8), iters=3, seed=0))
    cfg = method_config("ait", teacher.zsq_meta, "quick").with_options(
        epochs=1, iters_per_epoch=1, batch_size=4, warmup_epochs=0, live_range_epochs=0, lr=1e-30, gi_rho=1e-9,
        data="fixed", calib_data="fixed")
    images = torch.randn(8, 3, 8, 8)
    student, _ = distill(teacher, get_preset("gdfq-fixed", "w4a4"), cfg, fixed=images, start=res.model)
    fresh, _ = distill(teacher, get_preset("gdfq-fixed", "w4a4"), cfg, fixed=images)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(student(x), res.model(x), atol=1e-6)
        assert not torch.allclose(fresh(x), res.model(x), atol=1e-6)
    assert student is not res.model  # a copy: the caller's model is not trained in place


def test_warm_start_refusals():
    with pytest.raises(ZsqError, match="reconstructs the student on images first"):
        job = _job()
        job.calib = None
        METHODS.get("ait").fn(_teacher(), get_preset("gdfq", "w4a4"), job)
    with pytest.raises(ZsqError, match="reconstruction method"):
        METHODS.get("ait").fn(_teacher(), get_preset("gdfq", "w4a4"), _job(warm_start="bn-minmax"))
    with pytest.raises(ZsqError, match="nosuch"):
        METHODS.get("ait").fn(_teacher(), get_preset("gdfq", "w4a4"), _job(warm_start="nosuch"))
    with pytest.raises(ZsqError, match="warm_iters"):
        METHODS.get("ait").fn(_teacher(), get_preset("gdfq", "w4a4"), _job(warm_iters=0))


def test_standard_budget_warm_starts_and_synthesizes_genie_images_itself():
    import zsq

    res = zsq.quantize(_teacher(), method="ait", bits="w4a4", calibration=zsq.Calibration(num_images=8),
                       budget=zsq.RunBudget("standard", iters=2, epochs=2, iters_per_epoch=1, batch_size=4),
                       options={"warm_iters": 2, "lr": 1e-2})
    assert res.report["calib_source"] == "synthetic:genie"
    rep = res.report["method_report"]
    assert rep["data"] == "synthetic:genie"  # the images it made itself, then trained on (AIT with a fixed set)
    assert rep["config"]["warm_start"] == "genie" and rep["warm_start"]["method"] == "genie"
    assert rep["config"]["warmup_epochs"] == 0
    # without the standard budget or a warm start, AIT needs no images and synthesizes none
    from zsq.methods.registry import METHODS

    assert METHODS.get("ait").run_synth({}, "quick") is None
    assert METHODS.get("ait").run_synth({"warm_start": "none"}, "standard") is None
    assert METHODS.get("gdfq").run_synth({"warm_start": "brecq"}, "quick") == "genie"
    assert METHODS.get("hast").run_synth({}, "standard") == "hast"  # its own hard samples


def test_standard_budget_is_refused_where_no_curve_chose_it():
    from zsq.models.meta import ModelMeta
    from zsq.ptq.budgets import QUICK, get_budget

    big = ModelMeta(name="big", num_classes=10, input_size=(3, 224, 224), mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(ZsqError, match="standard budget is defined for 32-pixel"):
        method_config("ait", big, "standard")
    with pytest.raises(ZsqError, match="standard budget is not defined for reconstruction"):
        get_budget("standard", (3, 224, 224))
    std = get_budget("standard", (3, 32, 32))
    assert (std.name, std.iters, std.num_images) == ("standard", QUICK.iters, QUICK.num_images)
    with pytest.raises(ZsqError, match="budget must be one of quick, standard, paper"):
        get_budget("weekend")


@pytest.mark.parametrize("method", ["gdfq", "ait", "hast"])
def test_the_paper_budget_runs_the_published_recipe_on_a_tiny_model_and_refuses_a_warm_start(method, tmp_path):
    import dataclasses

    import zsq
    from zsq.qat.training_config import paper_config

    teacher = _teacher()
    budget = zsq.RunBudget("paper", iters=2, epochs=2, iters_per_epoch=1, batch_size=4)  # iters: the synthesis
    res = zsq.quantize(teacher, method=method, bits="w4a4", calibration=zsq.Calibration(num_images=8), budget=budget)
    rep = res.report["method_report"]
    paper = paper_config(method, teacher.zsq_meta)
    for key in ("lr", "weight_decay", "ce_scale", "kd_scale", "temperature", "optimizer", "kl_reduction"):
        assert rep["config"][key] == dataclasses.asdict(paper)[key], key  # the paper's loss and optimizer, only shortened
    assert rep["config"]["warm_start"] == "none" and "warm_start" not in rep
    with pytest.raises(ZsqError, match="published recipe"):  # refused with the options: before any image or file
        zsq.quantize(teacher, method=method, bits="w4a4", calibration=zsq.Calibration(num_images=8), budget=budget,
                     options={"warm_start": "genie"}, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
