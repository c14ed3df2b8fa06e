"""Exactness of model definitions + preprocessing against the shared assets (MANIFEST.md numbers)."""
import pytest
import torch

import zsq.assets as A
import zsq.models as zm
from zsq.data import load_images_tensor
from zsq.evaluation import evaluate
from tests.conftest import need_asset


def test_resnet20_exact_subset():
    w, d = need_asset(A.RESNET20), need_asset(A.CIFAR10_EXACT)
    m = zm.load("cifar10_resnet20", weights=w)
    r = evaluate(m, str(d))
    assert r["n"] == 1017
    assert r["top1"] == pytest.approx(91.64, abs=0.1)


def test_resnet20_first_logits():
    # Measured once: first test image (label 3, cat) -> logit 23.7305 for class 3.
    m = zm.load("cifar10_resnet20", weights=need_asset(A.RESNET20))
    x, y = load_images_tensor(need_asset(A.CIFAR10_EXACT), zm.get_meta(m), n=1)
    with torch.inference_mode():
        logits = m(x)[0]
    assert y.tolist() == [3]
    assert logits[3].item() == pytest.approx(23.7305, abs=1e-3)
    assert logits[0].item() == pytest.approx(-5.3097, abs=1e-3)


def test_lite0_first_images():
    # Measured once (commit with this test): on val1300[:50]
    #   PYTHONPATH=. python -c "import zsq.models as zm; from zsq.evaluation import evaluate;
    #     print(evaluate(zm.load('efficientnet_lite0', pretrained=True), '../shared/assets/imagenet/val1300[:50]'))"
    # -> top1 78.0, top5 94.0; and image 0 (label 472) has max logit 11.7784, logit sum -64.5889.
    # Any padding/BN-eps/preprocessing error moves these logits far beyond the tolerance.
    m = zm.load("efficientnet_lite0", weights=need_asset(A.LITE0))
    val = need_asset(A.VAL1300)
    x, y = load_images_tensor(val, zm.get_meta(m), n=2)
    with torch.inference_mode():
        logits = m(x)
    assert y.tolist() == [472, 260] and logits.argmax(1).tolist() == [472, 260]
    assert logits[0].max().item() == pytest.approx(11.7784, abs=2e-3)
    assert logits[0].sum().item() == pytest.approx(-64.5889, abs=2e-2)
    r = evaluate(m, f"{val}[:50]")
    assert (r["n"], r["top1"], r["top5"]) == (50, pytest.approx(78.0, abs=2.1), pytest.approx(94.0, abs=2.1))


@pytest.mark.slow
def test_resnet20_jpeg_full():
    m = zm.load("cifar10_resnet20", weights=need_asset(A.RESNET20))
    r = evaluate(m, str(need_asset(A.CIFAR10_JPEG)))
    assert r["n"] == 10000 and r["top1"] == pytest.approx(81.03, abs=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("depth,exact,jpeg", [(32, 92.82, 82.56), (44, 93.41, 82.67), (56, 92.72, 83.20)])
def test_deeper_resnets(depth, exact, jpeg):
    m = zm.load(f"cifar10_resnet{depth}", pretrained=True)
    assert evaluate(m, str(need_asset(A.CIFAR10_EXACT)))["top1"] == pytest.approx(exact, abs=0.1)
    assert evaluate(m, str(need_asset(A.CIFAR10_JPEG)))["top1"] == pytest.approx(jpeg, abs=0.1)


@pytest.mark.slow
def test_lite0_val1300():
    m = zm.load("efficientnet_lite0", weights=need_asset(A.LITE0))
    r = evaluate(m, str(need_asset(A.VAL1300)))
    assert r["n"] == 1300
    assert r["top1"] == pytest.approx(82.38, abs=0.3)
    assert r["top5"] == pytest.approx(95.15, abs=0.3)
