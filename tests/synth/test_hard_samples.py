"""HAST's hard-sample loss and SynQ's synthesis settings (zsq/synth/hard_samples.py)."""
import math

import torch
import torch.nn.functional as F

from zsq.models.meta import ModelMeta
from zsq.synth import get_synthesizer
from zsq.synth.hard_samples import hard_sample_loss

CIFAR10 = ModelMeta(name="c", num_classes=10, input_size=(3, 32, 32), mean=(0,) * 3, std=(1,) * 3)


def test_hard_sample_loss_matches_the_formula():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6)
    p = F.softmax(logits, 1)[torch.arange(6), y]
    for gamma in (0.5, 2.0):
        expected = torch.mean((1 - p) ** gamma * -p.log())
        assert math.isclose(float(hard_sample_loss(logits, y, gamma)), float(expected), rel_tol=1e-5)


def test_a_fully_confident_sample_gives_a_finite_gradient_at_gamma_below_one():
    logits = torch.zeros(2, 10)
    logits[0, 3] = 200.0  # p_y == 1 exactly in float32
    logits = logits.requires_grad_(True)
    y = torch.tensor([3, 1])
    naive = ((1 - F.softmax(logits, 1)[torch.arange(2), y]) ** 0.5 * F.cross_entropy(logits, y, reduction="none")).mean()
    (g_naive,) = torch.autograd.grad(naive, logits)
    assert not torch.isfinite(g_naive).all()  # the official formula: NaN
    loss = hard_sample_loss(logits, y, 0.5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad[1].abs().sum()) > 0
    assert torch.all(logits.grad[0] == 0)


def test_synq_synthesizes_with_its_own_beta_and_gamma():
    synq, hast = get_synthesizer("synq").config_cls.quick(CIFAR10), get_synthesizer("hast").config_cls.quick(CIFAR10)
    assert (synq.beta, synq.gamma) == (0.1, 0.5) and (hast.beta, hast.gamma) == (10.0, 2.0)
    assert (synq.batch_size, synq.iters, synq.augment) == (hast.batch_size, hast.iters, False)
