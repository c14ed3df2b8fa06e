"""QDrop's masks and mix (zsq.ptq.qdrop): the mix equals torch.where in value and gradient, masks keep with
probability p, are seeded and the same whichever rows a process keeps."""
import pytest
import torch

from zsq.ptq import qdrop


def test_mix_equals_where_in_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    q0, x0 = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    keep = qdrop.keep_mask(q0.shape, 0.5, torch.Generator().manual_seed(1), (0, 4))
    assert set(keep.unique().tolist()) == {0.0, 1.0} and keep.dtype == torch.float32
    up = torch.randn(q0.shape, generator=g)
    res = []
    for fn in (lambda q, x: torch.where(keep.bool(), q, x), lambda q, x: qdrop.mix(q, x, keep)):
        q, x = q0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        out = fn(q, x)
        out.backward(up)
        res.append((out.detach(), q.grad, x.grad))
    for a, b in zip(*res):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.5, 0.25, 0.3])
def test_masks_keep_with_probability_p_and_are_seeded(p):
    shape = (32, 16, 16, 16)
    a = qdrop.keep_mask(shape, p, torch.Generator().manual_seed(5), (0, 32))
    b = qdrop.keep_mask(shape, p, torch.Generator().manual_seed(5), (0, 32))
    c = qdrop.keep_mask(shape, p, torch.Generator().manual_seed(6), (0, 32))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.mean()) - p) < 0.005  # 131k draws: 4 standard errors is ~0.005
    # neighbouring values are independent (bytes of one random word): no pattern along the last axis
    flat = a.flatten()
    assert abs(float((flat[:-1] * flat[1:]).mean()) - p * p) < 0.005


def test_byte_masks_only_for_multiples_of_a_256th():
    assert qdrop.byte_threshold(0.5) == 128 and qdrop.byte_threshold(0.25) == 64
    assert qdrop.byte_threshold(0.3) is None


def test_rows_of_a_process_are_the_rows_of_the_whole_draw():
    shape = (8, 2, 4, 4)
    whole = qdrop.keep_mask(shape, 0.5, torch.Generator().manual_seed(3), (0, 8))
    part = qdrop.keep_mask(shape, 0.5, torch.Generator().manual_seed(3), (2, 5))
    assert torch.equal(whole[2:5], part)
    # an odd number of values (not a multiple of four bytes) still gets a full mask
    odd = qdrop.keep_mask((3, 1, 1, 3), 0.5, torch.Generator().manual_seed(3), (0, 3))
    assert odd.shape == (3, 1, 1, 3)
