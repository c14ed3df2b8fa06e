"""Quantizer flags change only through zsq.quant.state, and temporary changes always come back."""
import pytest
import torch

from tests.tiny_models import tiny_factory, tiny_images
from zsq.quant import act_quantizers, get_preset, quantize_model
from zsq.quant.state import observing, quantizer_flags, quantizers_disabled, set_flags


def _qmodel(fp=None):
    return quantize_model(tiny_factory() if fp is None else fp, get_preset("gdfq", "w4a4"))


def _flags(q):
    return [(x.enabled, x.observing) for _, x in act_quantizers(q)]


def test_quantizers_disabled_gives_the_float_output_and_puts_flags_back():
    fp = tiny_factory()
    q = _qmodel(fp)
    x = tiny_images(4)
    with observing(q):
        q(x)
    mixed = [(True, False), (False, False), (True, True)]
    quants = [x_ for _, x_ in act_quantizers(q)][:3]
    for qq, (e, o) in zip(quants, mixed):
        qq.enabled, qq.observing = e, o
    before = _flags(q)
    with torch.no_grad():
        with quantizers_disabled(q):
            assert torch.allclose(q(x), fp(x), atol=1e-5)
        assert not torch.allclose(q(x), fp(x), atol=1e-3)  # quantized again
    assert _flags(q) == before
    with pytest.raises(RuntimeError, match="boom"):
        with quantizer_flags(q, enabled=True, observing=True):
            assert all(f == (True, True) for f in _flags(q))
            raise RuntimeError("boom")
    assert _flags(q) == before


def test_observing_calibrates_and_freezes_even_on_error():
    q = _qmodel()
    with observing(q) as quants:
        assert all(x.observing and not x.enabled for x in quants)
        q(tiny_images(8))
    assert all(bool(x.initialized) and x.enabled and not x.observing for x in quants)
    scales = [x.scale.clone() for x in quants]
    with pytest.raises(RuntimeError):
        with observing(q):
            raise RuntimeError("interrupted")
    assert all(not x.observing and x.enabled for x in quants)  # nothing left observing
    assert any(not torch.equal(a, b.scale) or not bool(b.initialized) for a, b in zip(scales, quants))


def test_set_flags_leaves_unnamed_flags_alone():
    q = _qmodel()
    quants = [x for _, x in act_quantizers(q)]
    set_flags(quants, enabled=False)
    assert _flags(q) == [(False, False)] * len(quants)
    set_flags(quants, observing=True)
    assert _flags(q) == [(False, True)] * len(quants)


def test_range_subsamples_follow_the_run_seed_and_seed_0_is_the_fixed_stream():
    from zsq.quant.quantizer import LP_SAMPLE, QuantSpec, UniformQuantizer, subsample_with_extremes

    x = torch.randn(2 * LP_SAMPLE, generator=torch.Generator().manual_seed(5)) ** 3
    a, b = subsample_with_extremes(x, 100, 0), subsample_with_extremes(x, 100, 1)
    assert a.numel() == 102 and a[-2] == x.min() and a[-1] == x.max()
    assert torch.equal(a[:100], x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:100]])
    assert not torch.equal(a, b)
    assert subsample_with_extremes(x[:50], 100, 0).numel() == 50
    spec = QuantSpec(bits=4, per_channel=False, symmetric=True, observer="lp", lp_p=2.4, lp_ratios=20)
    scales = []
    for seed in (0, 0, 1):
        q = UniformQuantizer(spec)
        with observing(q, seed=seed):
            q(x.reshape(1, 1, 1, -1))
        assert q.sample_seed == seed
        scales.append(float(q.scale))
    assert scales[0] == scales[1] and scales[0] != scales[2]
