import copy

import pytest
import torch

from tests.tiny_models import tiny_factory, tiny_images, tiny_quantized
from zsq.errors import ZsqError
from zsq.ptq.output_distill import OutputDistillConfig, affine_parameters, distill_outputs

FP = tiny_factory(seed=0)  # the float model tiny_quantized quantizes


@pytest.fixture(scope="module")
def base():
    """One calibrated W2A4 tiny model (the Lp search is the slow part); each test works on a copy."""
    return tiny_quantized("genie", "w2a4")


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_distillation_lowers_the_kl_and_moves_only_affine_terms(base):
    q = copy.deepcopy(base)
    images = tiny_images(32, seed=3)
    before = _snapshot(q)
    affine = {id(p) for p in affine_parameters(q)}
    names_affine = {n for n, p in q.named_parameters() if id(p) in affine}
    rep = distill_outputs(q, FP, images, OutputDistillConfig(iters=60, lr=1e-2, batch_size=16), seed=0)
    assert rep["kl_end"] < 0.8 * rep["kl_start"] and rep["kept"] is True
    after = _snapshot(q)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= names_affine  # rounding, steps and BN statistics untouched
    assert any(k.endswith("running_mean") for k in before) and not any(k.endswith("running_mean") for k in moved)
    # requires_grad is restored and the model is left in eval mode
    assert all(p.requires_grad for p in q.parameters())
    assert not q.training


def test_activation_steps_move_only_when_asked(base):
    images = tiny_images(32, seed=3)
    q = copy.deepcopy(base)
    steps = {k for k in q.state_dict() if k.endswith(".scale") and "weight_quant" not in k}
    before = _snapshot(q)
    distill_outputs(q, FP, images, OutputDistillConfig(iters=5, params="affine+act"), seed=0)
    assert any(not torch.equal(before[k], q.state_dict()[k]) for k in steps)
    q2 = copy.deepcopy(base)
    before2 = _snapshot(q2)
    distill_outputs(q2, FP, images, OutputDistillConfig(iters=5), seed=0)
    assert all(torch.equal(before2[k], q2.state_dict()[k]) for k in steps)


def test_same_seed_same_model_and_zero_iters_changes_nothing(base):
    images = tiny_images(32, seed=3)
    a = copy.deepcopy(base)
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    cfg = OutputDistillConfig(iters=4, batch_size=8)
    distill_outputs(a, FP, images, cfg, seed=5)
    distill_outputs(b, FP, images, cfg, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    before = _snapshot(c)
    assert distill_outputs(c, FP, images, OutputDistillConfig(iters=0), seed=0) == {"iters": 0}
    assert all(torch.equal(before[k], v) for k, v in c.state_dict().items())


def test_the_teacher_is_the_float_model_not_the_quantized_one_with_quantizers_off(base):
    """Reconstruction writes rounded weights into the layers, so the quantized model with its quantizers
    off is not the float model: the KL is measured against the teacher that is passed."""
    q = copy.deepcopy(base)
    with torch.no_grad():
        for _, m in q.named_modules():
            if hasattr(m, "weight_quant") and m.weight_quant is not None:
                m.weight.copy_(m.weight_quant(m.weight))  # what hardening leaves behind
    images = tiny_images(8, seed=3)
    with torch.no_grad():
        t, s = torch.log_softmax(FP(images), 1), torch.log_softmax(q(images), 1)
    rep = distill_outputs(q, FP, images, OutputDistillConfig(iters=1), seed=0)
    assert rep["kl_start"] == pytest.approx(float((t.exp() * (t - s)).sum(1).mean()), rel=1e-4)
    assert rep["kl_start"] > 1e-4


@pytest.mark.parametrize("field,value,msg", [
    ("iters", -1, "distill_iters"), ("lr", 0.0, "distill_lr"), ("batch_size", 0, "distill_batch_size"),
    ("temperature", 0.0, "distill_temperature"), ("params", "all", "distill_params must be one of"),
])
def test_bad_options_are_refused_in_one_line(field, value, msg):
    with pytest.raises(ZsqError, match=msg):
        OutputDistillConfig(**{field: value})


def test_genie_runs_the_pass_when_asked_and_reports_it():
    import zsq.ptq.reconstruction_methods as rm
    from tests.tiny_models import make_tiny
    from zsq.methods.registry import QuantJob
    from zsq.quant import get_preset

    calib = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def run(extra):
        job = QuantJob(calib=calib, iters=3, batch_size=8, extra=extra)
        return rm.genie(make_tiny(), get_preset("genie", "w4a4"), job)

    plain, distilled = run({}), run({"distill_iters": 4, "distill_lr": 1e-3})
    assert "output_distill" not in plain.report
    rep = distilled.report["output_distill"]
    assert rep["iters"] == 4 and rep["params"] == "affine" and 0 < rep["kl_start"] < 1
    moved = [n for n, p in plain.model.named_parameters()
             if not torch.equal(p, dict(distilled.model.named_parameters())[n])]
    assert moved and all(n.endswith("bias") or ".bn" in n or "bn" in n.split(".")[-2] for n in moved), moved
    with pytest.raises(ZsqError, match="distill_params must be one of"):
        run({"distill_iters": 1, "distill_params": "weights"})


def test_a_pass_that_raises_the_kl_is_undone(base):
    """An lr far too large makes the KL worse: the affine terms go back to where they were."""
    q = copy.deepcopy(base)
    images = tiny_images(32, seed=3)
    before = _snapshot(q)
    rep = distill_outputs(q, FP, images, OutputDistillConfig(iters=3, lr=50.0, batch_size=8), seed=0)
    assert rep["kept"] is False and rep["kl_end"] >= rep["kl_start"]
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
