"""Genie-D class coverage (issue 15): assigned classes spread over the classes, and terms that pull
each image toward its class."""
import dataclasses

import pytest
import torch

from zsq.errors import ZsqError
from zsq.models.meta import get_meta, set_meta
from zsq.synth import synthesize
from zsq.synth.genie import GenieConfig, assigned_classes, class_terms
from zsq.synth.pixel_prior import PHOTO_MEAN, PHOTO_STD


def test_assigned_classes_are_spread_and_seeded():
    a = torch.cat([assigned_classes(10, 3, s, 5) for s in (0, 5, 10, 15, 20)])  # 5 batches of 5 = 25 images
    assert torch.equal(a, assigned_classes(10, 3, 0, 25))  # batch by batch = all at once
    counts = torch.bincount(a, minlength=10)
    assert counts.min() == 2 and counts.max() == 3  # every class, evenly
    assert len(set(assigned_classes(1000, 3, 0, 64).tolist())) == 64  # fewer images than classes: all distinct
    assert torch.equal(assigned_classes(1000, 3, 0, 64), assigned_classes(1000, 3, 0, 64))
    assert not torch.equal(assigned_classes(1000, 3, 0, 64), assigned_classes(1000, 4, 0, 64))


@pytest.mark.parametrize("kind", ["ce", "margin"])
def test_class_term_gradient_pushes_toward_the_assigned_class(kind):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 20, generator=g).requires_grad_(True)
    labels = torch.arange(8) * 2
    before = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    class_terms(logits, labels, kind, 1.0, 0.0)["class"].backward()
    after = (logits - 0.5 * logits.grad).softmax(1).gather(1, labels[:, None]).squeeze(1)
    assert (after > before).all()
    assert (logits.grad.gather(1, labels[:, None]) < 0).all()  # the assigned logit is raised


def test_diversity_term_is_zero_for_even_cover_and_pushes_toward_it():
    even = torch.eye(4) * 10
    assert float(class_terms(even, None, "none", 1.0, 1.0)["diversity"]) < 1e-3
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 5
    collapsed.requires_grad_(True)
    d = class_terms(collapsed, None, "none", 1.0, 1.0)["diversity"]
    d.backward()
    assert float(d.detach()) > 0.5 and (collapsed.grad[:, 0] > 0).all()  # lowers the shared class's logit


def _input_sensitive(teacher):
    """The tiny teacher's logits barely depend on its input (a large constant part): centre and scale
    its classifier so that images can reach any class, as a trained teacher's can. ImageNet normalisation,
    so that the pixel prior is Genie's mean 0 / std 1 (the N(0, 1) images centred on here)."""
    with torch.no_grad():
        f = teacher[:-1](torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(0))).mean(0)
        teacher[-1].weight.mul_(30)
        teacher[-1].bias.copy_(-teacher[-1].weight @ f)
    return set_meta(teacher, dataclasses.replace(get_meta(teacher), mean=PHOTO_MEAN, std=PHOTO_STD))


def test_genie_with_class_loss_covers_assigned_classes(tiny_teacher):
    tiny_teacher = _input_sensitive(tiny_teacher)
    kw = dict(budget="quick", iters=30, batch_size=8, seed=1)
    plain = synthesize(tiny_teacher, "genie", 16, **kw)
    cover = synthesize(tiny_teacher, "genie", 16, class_loss="ce", class_weight=5.0, **kw)
    assert plain.labels is None
    assert torch.equal(cover.labels, assigned_classes(10, 1, 0, 16))
    with torch.no_grad():
        hit_plain = (tiny_teacher(plain.images).argmax(1) == cover.labels).float().mean()
        hit_cover = (tiny_teacher(cover.images).argmax(1) == cover.labels).float().mean()
    assert hit_cover >= 0.6 and hit_cover > hit_plain + 0.3  # measured: 0.75 vs 0.06
    again = synthesize(tiny_teacher, "genie", 16, class_loss="ce", class_weight=5.0, **kw)
    assert torch.equal(again.images, cover.images)


def test_bad_class_options():
    with pytest.raises(ZsqError, match="class_loss"):
        GenieConfig(class_loss="focal")
    with pytest.raises(ZsqError, match=">= 0"):
        GenieConfig(diversity_weight=-1.0)


def test_set_made_before_the_coverage_options_still_resumes(tiny_teacher, tmp_path):
    import json

    kw = dict(budget="quick", iters=2, batch_size=4, seed=0)
    first = synthesize(tiny_teacher, "genie", 8, out=tmp_path, **kw)
    man = tmp_path / "ckpt" / "manifest.json"
    m = json.loads(man.read_text())
    for k in ("class_loss", "class_weight", "diversity_weight"):  # as written before these fields existed
        del m["fingerprint"]["config"][k]
    man.write_text(json.dumps(m))
    again = synthesize(tiny_teacher, "genie", 8, out=tmp_path, resume=True, **kw)
    assert torch.equal(again.images, first.images)
    with pytest.raises(ZsqError, match=r"config\.class_loss \(checkpoint: 'none', now: 'ce'\)"):
        synthesize(tiny_teacher, "genie", 8, out=tmp_path, resume=True, class_loss="ce", **kw)
