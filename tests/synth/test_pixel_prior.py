"""zsq.synth.pixel_prior: photographs' pixel statistics in a model's input space, and Genie's input term."""
import pytest
import torch

from zsq.models.meta import ModelMeta
from zsq.synth.pixel_prior import PHOTO_MEAN, PHOTO_STD, PixelPrior, clamp_to_photo_range

GENIE_PRIOR = PixelPrior.genie()


def _meta(mean, std, channels=3):
    return ModelMeta(name="m", num_classes=10, input_size=(channels, 8, 8), mean=mean, std=std)


def test_imagenet_normalisation_gives_genies_prior_and_leaves_images_untouched():
    prior = PixelPrior.of(_meta(PHOTO_MEAN, PHOTO_STD))
    assert prior.identity and prior == GENIE_PRIOR
    x = torch.randn(2, 3, 4, 4)
    assert prior.map(x) is x


def test_half_normalisation_halves_the_contrast_and_shifts_the_mean():
    prior = PixelPrior.of(_meta((127 / 255,) * 3, (128 / 255,) * 3))  # EfficientNet-Lite
    assert not prior.identity
    assert prior.std == pytest.approx([0.229 / (128 / 255), 0.224 / (128 / 255), 0.225 / (128 / 255)])
    assert prior.mean[2] == pytest.approx((0.406 - 127 / 255) / (128 / 255))
    x = torch.randn(64, 3, 16, 16)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    y = prior.map(x)
    assert y.std((0, 2, 3)).tolist() == pytest.approx(list(prior.std), rel=1e-4)
    assert y.mean((0, 2, 3)).tolist() == pytest.approx(list(prior.mean), abs=1e-5)
    # pixels: the mapped images have ImageNet's statistics in [0, 1] units
    pixels = y * torch.tensor(128 / 255) + torch.tensor(127 / 255)
    assert pixels.mean((0, 2, 3)).tolist() == pytest.approx(list(PHOTO_MEAN), abs=1e-5)


def test_input_term_is_zero_at_the_prior_and_grows_away_from_it():
    prior = PixelPrior.of(_meta((0.5,) * 3, (0.5,) * 3))
    x = torch.randn(5, 3, 8, 8)
    std, mean = torch.std_mean(x, dim=(2, 3), keepdim=True)
    at_prior = (x - mean) / std * torch.tensor(prior.std).view(1, 3, 1, 1) + torch.tensor(prior.mean).view(1, 3, 1, 1)
    assert float(prior.loss(at_prior)) < 1e-10
    assert float(GENIE_PRIOR.loss((x - mean) / std)) < 1e-10
    assert float(GENIE_PRIOR.loss(at_prior)) > 0.5  # Genie's 0 / 1 prior wants twice this contrast
    assert float(prior.loss(x * 3)) > 1.0


def test_other_channel_counts_repeat_the_rgb_average():
    prior = PixelPrior.of(_meta((0.5,), (0.25,), channels=1))
    assert len(prior.mean) == len(prior.std) == 1
    assert prior.std[0] == pytest.approx(sum(PHOTO_STD) / 3 / 0.25)
    x = torch.randn(4, 1, 8, 8)
    assert float(PixelPrior.genie(1).loss(x)) >= 0 and prior.map(x).shape == x.shape


def test_clamp_to_photo_range_bounds_pixels_to_zero_one_before_normalisation():
    meta = ModelMeta("lite_like", 10, (3, 4, 4), (0.5, 0.4, 0.3), (0.5, 0.25, 0.2))
    x = torch.linspace(-10, 10, 3 * 16).view(1, 3, 4, 4)
    pixels = clamp_to_photo_range(x, meta) * torch.tensor(meta.std).view(1, 3, 1, 1) + torch.tensor(meta.mean).view(1, 3, 1, 1)
    assert pixels.min().item() == pytest.approx(0.0, abs=1e-6) and pixels.max().item() == pytest.approx(1.0, abs=1e-6)
    inside = torch.zeros(1, 3, 4, 4)  # the mean pixel is a photograph's: untouched
    assert torch.equal(clamp_to_photo_range(inside, meta), inside)
