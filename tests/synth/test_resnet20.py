import torch

import zsq.assets
from tests.conftest import need_asset
from zsq.synth import synthesize
from zsq.synth.bn_stats import batchnorm_layers
from zsq.synth.swing import count_swing, swing_copy


def test_genie_on_the_shared_resnet20():
    from zsq.models import load

    teacher = load("cifar10_resnet20", weights=str(need_asset(zsq.assets.RESNET20)))
    assert len(batchnorm_layers(teacher)) == 19
    assert count_swing(swing_copy(teacher)) == 2  # layer2.0.conv1, layer3.0.conv1 (option-A shortcuts)
    data = synthesize(teacher, "genie", 8, iters=3, batch_size=8)
    assert data.images.shape == (8, 3, 32, 32) and torch.isfinite(data.images).all()
    assert 0 < data.meta["bns_loss"] < 5 and data.meta["model"] == "cifar10_resnet20"


def test_genie_quick_budget_lowers_bns_on_the_shared_resnet20():
    """The quick budget's narrow generator and learning rates must make progress on a real teacher:
    ten iterations end below a tenth of the untrained generator's BNS (measured: 0.067 of it; Genie's
    width-128 generator with the documented rates, or rates 10x higher, end at 0.13-0.14)."""
    from zsq.models import load

    teacher = load("cifar10_resnet20", weights=str(need_asset(zsq.assets.RESNET20)))
    start = synthesize(teacher, "genie", 32, iters=0, batch_size=32)
    trained = synthesize(teacher, "genie", 32, iters=10, batch_size=32)
    assert trained.meta["config"]["width"] == 64
    assert trained.meta["bns_loss"] < 0.1 * start.meta["bns_loss"]
