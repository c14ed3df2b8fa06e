import pytest
import torch

from zsq.errors import ZsqError
from zsq.synth.genie import GenieConfig
from zsq.synth.generators import GDFQGenerator, GDFQImageNetGenerator, GenieGenerator, gdfq_generator


def _standardized_per_channel(x):
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    return torch.allclose(mean, torch.zeros_like(mean), atol=1e-5) and torch.allclose(var, torch.ones_like(var), atol=2e-2)


def test_gdfq_cifar_generator_shape_eps_and_output_normalisation():
    torch.manual_seed(0)
    g = gdfq_generator(10, 32)
    assert isinstance(g, GDFQGenerator) and g.init_size == 8
    assert g.bn1.eps == 0.8 and g.bn2.eps == 0.8 and g.bn0.eps == 1e-5
    assert g.l1.out_features == 128 * 8 * 8 and not g.bn_out.affine
    z, y = torch.randn(6, 100), torch.randint(0, 10, (6,))
    x = g(z, y)
    assert x.shape == (6, 3, 32, 32)
    assert _standardized_per_channel(x)
    # the label changes the image (z is multiplied by the label embedding)
    assert not torch.allclose(g(z, (y + 1) % 10), x)


def test_gdfq_imagenet_generator_uses_conditional_bn():
    torch.manual_seed(0)
    g = gdfq_generator(1000, 224)
    assert isinstance(g, GDFQImageNetGenerator) and g.init_size == 56
    assert [g.cbn0.bn.eps, g.cbn1.bn.eps, g.cbn2.bn.eps] == [1e-5, 0.8, 0.8]
    small = GDFQImageNetGenerator(5, 16)
    x = small(torch.randn(4, 100), torch.tensor([0, 1, 2, 3]))
    assert x.shape == (4, 3, 16, 16) and _standardized_per_channel(x)


def test_genie_generator_scales_with_input_and_small_head():
    g32 = GenieGenerator(32)
    assert g32.init_size == 8 and g32.l1.out_features == 128 * 64
    x = g32(torch.randn(5, 256))
    assert x.shape == (5, 3, 32, 32) and _standardized_per_channel(x)
    small = GenieGenerator(224, head="small")  # the paper head would be a 256 -> 128*56*56 (103M) Linear
    assert small.l1.out_features == 128 * 14 * 14 and sum(p.numel() for p in small.parameters()) < 1e7
    assert small(torch.randn(2, 256)).shape == (2, 3, 224, 224)


def test_genie_generator_width_sets_channels_and_cost():
    narrow, wide = GenieGenerator(32, width=64), GenieGenerator(32)
    assert narrow.l1.out_features == 64 * 8 * 8
    convs = [m for m in narrow.body if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(64, 32), (32, 3)]
    x = narrow(torch.randn(6, 256))
    assert x.shape == (6, 3, 32, 32) and _standardized_per_channel(x)
    n = lambda g: sum(p.numel() for p in g.parameters())  # noqa: E731
    assert n(narrow) < 0.55 * n(wide)


@pytest.mark.parametrize("width", [0, 1, 63])
def test_genie_generator_rejects_bad_width(width):
    with pytest.raises(ZsqError, match="even number"):
        GenieGenerator(32, width=width)
    with pytest.raises(ZsqError, match="even number"):
        GenieConfig(width=width)


@pytest.mark.parametrize("side", [32, 64, 68, 224])
def test_gdfq_generator_follows_the_one_size_class(side):
    """The CIFAR-vs-ImageNet line is ModelMeta.small_input's, 64 px included (it once said < 64 here)."""
    from zsq.models.meta import ModelMeta

    small = ModelMeta("m", 10, (3, side, side), (0.5,) * 3, (0.5,) * 3).small_input
    assert small is (side <= 64)
    assert isinstance(gdfq_generator(10, side), GDFQGenerator if small else GDFQImageNetGenerator)
