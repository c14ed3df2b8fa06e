"""The quick budget depends on the input size: 32²'s 256 images x 300 iterations/unit would take hours
at 224², so from LARGE_INPUT_PIXELS up quick is QUICK_LARGE; paper and explicit overrides are unchanged."""
import dataclasses

import pytest
import torch

import zsq.ptq.reconstruction_methods as rm
from tests.tiny_models import UNITS_META, make_tiny
from zsq.api import default_num_images
from zsq.methods.registry import QuantJob
from zsq.models.meta import set_meta
from zsq.ptq.budgets import PAPER, QUICK, QUICK_LARGE, get_budget
from zsq.quant import get_preset


@pytest.mark.parametrize("size, want", [((3, 32, 32), QUICK), ((3, 95, 96), QUICK), ((3, 96, 96), QUICK_LARGE),
                                        ((3, 224, 224), QUICK_LARGE), (None, QUICK)])
def test_quick_budget_follows_the_input_size(size, want):
    assert get_budget("quick", size) == want
    assert get_budget("paper", size) == PAPER  # the paper's budget is the paper's at any size


def test_default_number_of_images_follows_the_budget():
    assert default_num_images("ptq", "quick", (3, 224, 224)) == QUICK_LARGE.num_images == 64
    assert default_num_images("ptq", "quick", (3, 32, 32)) == QUICK.num_images == 256
    assert default_num_images("qat", "quick", (3, 224, 224)) == 256  # QAT's fixed-set size is not a PTQ budget


class _Stop(Exception):
    pass


def _engine_budget(monkeypatch, input_size, iters=None):
    seen = {}

    class Spy:
        def __init__(self, qmodel, calib, recipe, budget, *a, **k):
            seen["budget"] = budget
            raise _Stop

    monkeypatch.setattr(rm, "Reconstructor", Spy)
    model = set_meta(make_tiny(), dataclasses.replace(UNITS_META, input_size=input_size))
    calib = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(0))
    with pytest.raises(_Stop):
        rm.genie(model, get_preset("genie", "w4a4"), QuantJob(calib=calib, iters=iters))
    return seen["budget"]


def test_the_engine_gets_the_budget_for_the_models_input(monkeypatch):
    assert _engine_budget(monkeypatch, (3, 16, 16)).iters == QUICK.iters
    assert _engine_budget(monkeypatch, (3, 112, 112)).iters == QUICK_LARGE.iters
    assert _engine_budget(monkeypatch, (3, 112, 112), iters=7).iters == 7  # --iters still wins
