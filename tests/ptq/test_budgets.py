"""The quick budget depends on the input size: 32²'s 256 images x 300 iterations/unit would take hours
at 224², so from LARGE_INPUT_PIXELS up quick is QUICK_LARGE; paper and explicit overrides are unchanged."""
import dataclasses

import pytest
import torch

import zsq.ptq.reconstruction_methods as rm
from tests.tiny_models import UNITS_META, make_tiny
from zsq.api import default_num_images
from zsq.errors import ZsqError
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


def _engine_budget(monkeypatch, input_size, iters=None, **extra):
    return _engine_args(monkeypatch, input_size, iters, **extra)["budget"]


def _engine_args(monkeypatch, input_size, iters=None, bits="w4a4", **extra):
    seen = {}

    class Spy:
        def __init__(self, qmodel, calib, recipe, budget, *a, **k):
            seen["budget"], seen["opts"] = budget, a[0]
            raise _Stop

    monkeypatch.setattr(rm, "Reconstructor", Spy)
    model = set_meta(make_tiny(), dataclasses.replace(UNITS_META, input_size=input_size))
    calib = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(0))
    with pytest.raises(_Stop):
        rm.genie(model, get_preset("genie", bits), QuantJob(calib=calib, iters=iters, extra=extra))
    return seen


def test_the_engine_gets_the_budget_for_the_models_input(monkeypatch):
    assert _engine_budget(monkeypatch, (3, 16, 16)).iters == QUICK.iters
    assert _engine_budget(monkeypatch, (3, 112, 112)).iters == QUICK_LARGE.iters
    assert _engine_budget(monkeypatch, (3, 112, 112), iters=7).iters == 7  # --iters still wins


def test_the_large_quick_budget_rounds_with_gptq_unless_asked(monkeypatch):
    assert QUICK_LARGE.rounding == "gptq" and QUICK.rounding == PAPER.rounding == "learned"
    assert _engine_args(monkeypatch, (3, 112, 112), bits="w4a8")["opts"].rounding == "gptq"
    assert _engine_args(monkeypatch, (3, 112, 112))["opts"].rounding == "learned"  # W4A4: soft bits measured better
    assert _engine_args(monkeypatch, (3, 16, 16))["opts"].rounding == "learned"
    assert _engine_args(monkeypatch, (3, 112, 112), bits="w8a8")["opts"].rounding == "learned"  # fine grids
    assert _engine_args(monkeypatch, (3, 112, 112), bits="w4a8", rounding="learned")["opts"].rounding == "learned"
    assert _engine_args(monkeypatch, (3, 16, 16), rounding="gptq")["opts"].rounding == "gptq"
    with pytest.raises(ZsqError, match="rounding must be one of"):
        dataclasses.replace(QUICK, rounding="nearest")


def test_genie_hardens_coarse_soft_bits_with_gptq_unless_asked(monkeypatch):
    """default_hardening: GPTQ hardening where it was measured to pay (W2; below W5 at 100 steps or fewer),
    1[V >= 0] elsewhere, never with GPTQ rounding (no soft bits) or a refit (fitted to 1[V >= 0]); the user's
    choice always wins."""
    def hardening(bits, size=(3, 16, 16), iters=None, **extra):
        return _engine_args(monkeypatch, size, iters, bits=bits, **extra)["opts"].hardening

    assert hardening("w2a4") == "gptq"
    assert hardening("w4a4") == "nearest" and hardening("w8a8") == "nearest"  # 300 steps at 16²
    assert hardening("w4a4", size=(3, 112, 112)) == "gptq"  # QUICK_LARGE: 100 steps
    assert hardening("w4a4", iters=100) == "gptq" and hardening("w4a4", iters=101) == "nearest"
    assert hardening("w8a8", size=(3, 112, 112)) == "nearest"  # a fine grid
    assert hardening("w4a8", size=(3, 112, 112)) == "nearest"  # rounded by GPTQ: nothing learned to harden
    assert hardening("w2a4", refit_iters=5) == "nearest"
    assert hardening("w2a4", hardening="nearest") == "nearest"
    assert hardening("w4a4", hardening="gptq") == "gptq"
    with pytest.raises(ZsqError, match="rounding=gptq learns none"):
        hardening("w4a4", hardening="gptq", rounding="gptq")


@pytest.mark.parametrize("method", ["qdrop", "brecq", "adaround"])
def test_the_baselines_keep_their_learned_rounding_on_the_large_budget(monkeypatch, method):
    """GPTQ was measured for Genie-M only; AdaRound/BRECQ/QDrop with GPTQ codes would not be those methods."""
    seen = {}

    class Spy:
        def __init__(self, qmodel, calib, recipe, budget, opts, *a, **k):
            seen["opts"] = opts
            raise _Stop

    monkeypatch.setattr(rm, "Reconstructor", Spy)
    model = set_meta(make_tiny(), dataclasses.replace(UNITS_META, input_size=(3, 112, 112)))
    calib = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    run = getattr(rm, method)
    with pytest.raises(_Stop):
        run(model, get_preset("brecq", "w4a8"), QuantJob(calib=calib))
    assert seen["opts"].rounding == "learned"
    with pytest.raises(_Stop):  # their 1[V >= 0] hardening too, at any weight width
        run(model, get_preset("brecq", "w2a4"), QuantJob(calib=calib))
    assert seen["opts"].hardening == "nearest"
    with pytest.raises(_Stop):  # still available when asked for
        run(model, get_preset("brecq", "w4a8"), QuantJob(calib=calib, extra={"rounding": "gptq"}))
    assert seen["opts"].rounding == "gptq"
    assert "budget_rounding" not in rm.RECIPES[method].to_dict()  # resume fingerprints unchanged
