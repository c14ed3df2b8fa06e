"""benchmarks/unit_generalization.py: one unit reconstructed alone, its input from the float model."""
import pytest
import torch

from tests.tiny_models import tiny_factory, tiny_images
from zsq.ptq.budgets import soft_bit_lr
from zsq.quant import get_preset
from zsq.quant.transforms import quantize_model


def test_a_variant_sets_iterations_rounding_weight_beta_and_soft_bit_lr(ug):
    rec, budget = ug._recipe({"iters": "20", "round_weight": "10", "beta_end": "1", "lr_v": "0.1"})
    assert budget.iters == 20 and rec.beta_end == 1.0
    assert rec.phases[0].round_weight == 10.0 and rec.phases[0].lr_v == 0.1
    rec, budget = ug._recipe({})  # Genie-M's own: lambda 1, beta to 2, the soft-bit lr sized to 50 steps
    assert budget.iters == 50 and rec.beta_end == 2.0 and rec.phases[0].round_weight == 1.0
    assert rec.phases[0].lr_v == soft_bit_lr(1e-3, 50)
    with pytest.raises(SystemExit, match=r"--variant: unknown key\(s\) \['lrv'\]"):
        ug._recipe({"lrv": "0.1"})
    with pytest.raises(SystemExit, match="--variant: could not convert string to float: 'x'"):
        ug._recipe({"lr_v": "x"})
    with pytest.raises(SystemExit, match="--variant: lr_v must be"):
        ug._recipe({"lr_v": "-1"})


def test_only_the_chosen_unit_is_quantized_and_iters_0_is_round_to_nearest(ug):
    fp, qc = tiny_factory(seed=1), get_preset("genie", "w4a4")
    eng, rec = ug._one(fp, qc, tiny_images(16), {"iters": "0"}, "block")
    start = quantize_model(fp, qc)
    unit = next(u for u in eng.units if u.name == "block")
    for name in unit.layers:  # no step taken: round-to-nearest on the starting grid
        layer = start.get_submodule(name)
        assert torch.equal(eng.qmodel.get_submodule(name).weight, layer.weight_quant(layer.weight.detach()))
    x = tiny_images(4, seed=5)
    with torch.no_grad():  # before the unit the quantized model is the float one
        assert torch.equal(eng.qmodel.conv1(x), fp.conv1(x))
        assert not torch.equal(eng.qmodel(x), fp(x))  # the unit itself is quantized
    assert rec["hard_loss"] > 0
    moved, _ = ug._one(fp, qc, tiny_images(16), {"iters": "1"}, "block")  # one step already moves the weights
    assert not all(torch.equal(moved.qmodel.get_submodule(n).weight, eng.qmodel.get_submodule(n).weight)
                   for n in unit.layers)
    assert ug._unit_error(eng, "block", tiny_images(8, seed=6)) > 0
    with pytest.raises(SystemExit, match="no unit 'nope'; the units are conv1, block"):
        ug._one(fp, qc, tiny_images(8), {"iters": "0"}, "nope")
