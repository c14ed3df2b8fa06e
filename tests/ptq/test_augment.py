import pytest
import torch
import torch.nn.functional as F

from zsq.errors import ZsqError
from zsq.ptq.augment import augmented_views
from zsq.ptq.budgets import Budget, EngineOptions, GENIE
from zsq.ptq.reconstruct import Reconstructor
from zsq.quant import get_preset, quantize_model


def _is_flip_shift_of(view, img, s):
    padded = F.pad(img[None], (s, s, s, s), mode="reflect")[0]
    h, w = img.shape[-2:]
    for dy in range(2 * s + 1):
        for dx in range(2 * s + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            if torch.equal(view, crop) or torch.equal(view, crop.flip(-1)):
                return True
    return False


def test_views_shapes_content_and_determinism():
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    v = augmented_views(x, 2, seed=5)
    assert v.shape == (12, 3, 16, 16)
    assert all(_is_flip_shift_of(v[k * 6 + i], x[i], 2) for k in range(2) for i in range(6))
    assert not torch.equal(v[:6], x) and not torch.equal(v[:6], v[6:])  # the views differ from the images and each other
    assert torch.equal(v, augmented_views(x, 2, seed=5))
    assert not torch.equal(v, augmented_views(x, 2, seed=6))
    assert augmented_views(x, 0, seed=5).shape == (0, 3, 16, 16)
    with pytest.raises(ZsqError, match=">= 0"):
        augmented_views(x, -1, seed=5)


def test_engine_trains_on_views_but_judges_on_plain_held_out_images(tiny, tiny_images):
    q = quantize_model(tiny, get_preset("genie", "w4a4"))
    eng = Reconstructor(q, tiny_images, GENIE, Budget("t", 2, 16, 48), EngineOptions(augment=2, holdout=0.125, keep_better=True))
    assert eng.n_train == 42 * 3 and eng.calib.shape[0] == 42 * 3 + 6
    plain = Reconstructor(quantize_model(tiny, get_preset("genie", "w4a4")), tiny_images, GENIE,
                          Budget("t", 2, 16, 48), EngineOptions(holdout=0.125, keep_better=True))
    assert torch.equal(eng.calib[:42], plain.calib[:42]) and torch.equal(eng.calib[-6:], plain.calib[-6:])
    rep = eng.run()
    assert rep["budget"]["augment"] == 2 and rep["budget"]["train_images"] == 126
    with pytest.raises(ZsqError, match="augment"):
        EngineOptions(augment=-1)
