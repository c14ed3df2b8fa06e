"""act_init=bn: reconstruction starts from bn-minmax's activation steps, not from the (synthetic)
calibration images, whose statistics can be far from real data's."""
import dataclasses

import pytest
import torch

import zsq.ptq.reconstruction_methods as rm
from tests.tiny_models import make_tiny
from zsq.errors import ZsqError
from zsq.methods.registry import QuantJob
from zsq.quant import calibrate_from_bn, get_preset, quantize_model
from zsq.quant.inventory import act_quantizers


class _Stop(Exception):
    pass


def _start_scales(monkeypatch, act_init, calib: torch.Tensor, preset: str = "genie", bits: str = "w4a4") -> dict:
    seen = {}

    class Spy:
        def __init__(self, qmodel, *a, **k):
            seen.update({n: (bool(q.initialized), q.scale.detach().clone()) for n, q in act_quantizers(qmodel)})
            raise _Stop

    monkeypatch.setattr(rm, "Reconstructor", Spy)
    job = QuantJob(calib=calib, iters=2, batch_size=8, extra={} if act_init is None else {"act_init": act_init})
    with pytest.raises(_Stop):
        rm.genie(make_tiny(), get_preset(preset, bits), job)
    return seen


def test_bn_init_starts_from_bn_minmax_ranges(monkeypatch):
    calib = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.05  # narrow "synthetic" set
    ref = calibrate_from_bn(quantize_model(make_tiny(), get_preset("genie", "w4a4")), seed=0)
    want = {n: q.scale.detach() for n, q in act_quantizers(ref)}
    got = _start_scales(monkeypatch, "bn", calib)
    assert got.keys() == want.keys() and all(init for init, _ in got.values())
    for n, (_, s) in got.items():
        assert torch.equal(s, want[n]), n
    data = _start_scales(monkeypatch, "data", calib)  # the papers' start: initialised later, on the images
    assert not any(init for init, _ in data.values())


def test_act_init_rejects_other_values():
    job = QuantJob(calib=torch.randn(4, 3, 16, 16), iters=1, extra={"act_init": "images"})
    with pytest.raises(ZsqError, match="act_init must be data|bn or null, got .images."):
        rm.genie(make_tiny(), get_preset("genie", "w4a4"), job)


def test_the_preset_chooses_the_start_and_set_overrides_it(monkeypatch):
    """deploy (v3) starts from BN statistics, the paper presets from the images; --set act_init wins."""
    calib = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.05
    assert get_preset("deploy", "w8a8").act_init == "bn" and get_preset("genie", "w4a4").act_init == "data"
    ref = calibrate_from_bn(quantize_model(make_tiny(), get_preset("deploy", "w8a8")), seed=0)
    want = {n: q.scale.detach() for n, q in act_quantizers(ref)}
    deploy = _start_scales(monkeypatch, None, calib, "deploy", "w8a8")
    assert deploy.keys() == want.keys() and all(init for init, _ in deploy.values())
    # the image input's quantizer is pinned by the preset either way; every other one comes from BN
    assert all(torch.equal(s, want[n]) for n, (_, s) in deploy.items())
    data = _start_scales(monkeypatch, "data", calib, "deploy", "w8a8")
    assert sum(init for init, _ in data.values()) < len(data)  # left for the images
    genie = _start_scales(monkeypatch, None, calib)
    assert not any(init for init, _ in genie.values())


def test_quant_config_refuses_an_unknown_act_init():
    with pytest.raises(ZsqError, match="act_init must be one of data, bn, got 'images'"):
        dataclasses.replace(get_preset("deploy", "w8a8"), act_init="images")


def _no_bn_model() -> torch.nn.Module:
    from tests.tiny_models import UNITS_META
    from zsq.models.meta import set_meta

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    return set_meta(m.eval(), UNITS_META)


def test_a_model_without_bn_starts_from_the_images_unless_bn_is_asked_for(monkeypatch, caplog):
    calib = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    seen = {}

    class Spy:
        def __init__(self, qmodel, *a, **k):
            seen.update({n: bool(q.initialized) for n, q in act_quantizers(qmodel)})
            raise _Stop

    monkeypatch.setattr(rm, "Reconstructor", Spy)
    with caplog.at_level("WARNING"), pytest.raises(_Stop):
        rm.genie(_no_bn_model(), get_preset("deploy", "w8a8"), QuantJob(calib=calib, iters=1, batch_size=8))
    assert "has no BatchNorm layers: starting them from the calibration images" in caplog.text
    assert sum(seen.values()) < len(seen)  # left for the images (only the pinned image input is set)
    job = QuantJob(calib=calib, iters=1, batch_size=8, extra={"act_init": "bn"})
    with pytest.raises(ZsqError, match="act_init=bn .* no BatchNorm layers; use --set act_init=data"):
        rm.genie(_no_bn_model(), get_preset("deploy", "w8a8"), job)
