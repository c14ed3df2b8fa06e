import pytest
import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.synth.bn_stats import GENIE_STD_EPS, BNStatsRecorder, batchnorm_layers, measure_genie_bns
from tests.tiny_models import tiny_bn_cnn


def _set_running_stats_from(model, x, genie_form: bool):
    """Set every BN's running stats, layer by layer, to the statistics of its input on batch x."""
    for name, bn in batchnorm_layers(model):
        seen = {}
        h = bn.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0].detach()))
        with torch.no_grad():
            model(x)
        h.remove()
        a = seen["x"]
        var_b, mean = torch.var_mean(a, dim=(0, 2, 3), unbiased=False)
        bn.running_mean.copy_(mean)
        if genie_form:  # target std is sqrt(running_var + 1e-6) vs the unbiased batch std
            bn.running_var.copy_(torch.var(a, dim=(0, 2, 3), unbiased=True) - GENIE_STD_EPS)
        else:
            bn.running_var.copy_(var_b)


@pytest.mark.parametrize("genie_form", [True, False])
def test_loss_is_zero_when_batch_stats_equal_running_stats(genie_form):
    model = tiny_bn_cnn()
    x = torch.randn(6, 3, 16, 16)
    _set_running_stats_from(model, x, genie_form)
    with BNStatsRecorder(model) as rec:
        model(x)
        loss = rec.genie_loss() if genie_form else rec.gdfq_loss()
        assert len(rec.records) == 3
    assert float(loss.detach()) < 1e-9
    # and it is clearly non-zero for another batch
    with BNStatsRecorder(model) as rec:
        model(torch.randn(6, 3, 16, 16) * 2 + 1)
        assert float((rec.genie_loss() if genie_form else rec.gdfq_loss()).detach()) > 1e-2


def test_loss_values_match_the_formulas_and_gradient_reaches_input():
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with BNStatsRecorder(bn) as rec:
        bn(x)
        genie, gdfq = rec.genie_loss(), rec.gdfq_loss()
    std, mean = torch.std_mean(x, dim=(0, 2, 3), unbiased=True)
    var_b = torch.var(x, dim=(0, 2, 3), unbiased=False)
    want_genie = torch.mean((mean - bn.running_mean) ** 2) + torch.mean((std - (bn.running_var + 1e-6).sqrt()) ** 2)
    want_gdfq = torch.mean((mean - bn.running_mean) ** 2) + torch.mean((var_b - bn.running_var) ** 2)
    assert torch.allclose(genie, want_genie, atol=1e-6)
    assert torch.allclose(gdfq, want_gdfq, atol=1e-6)
    genie.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_hooks_are_removed_even_on_error(tiny_teacher):
    with pytest.raises(RuntimeError):
        with BNStatsRecorder(tiny_teacher):
            raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for m in tiny_teacher.modules())


def test_model_without_batchnorm_is_refused():
    with pytest.raises(ZsqError, match="no BatchNorm2d.*cannot work"):
        BNStatsRecorder(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def test_measure_genie_bns_restores_mode(tiny_teacher):
    tiny_teacher.train()
    v = measure_genie_bns(tiny_teacher, torch.randn(8, 3, 16, 16), 4)
    assert v > 0 and tiny_teacher.training
