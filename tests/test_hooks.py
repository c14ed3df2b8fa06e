"""zsq.hooks.Hooks: hooks live exactly as long as their block."""
import pytest
import torch
import torch.nn as nn

from zsq.hooks import Hooks


def test_hooks_are_removed_when_the_block_ends_even_on_error():
    m = nn.Linear(3, 2)
    seen = []
    with Hooks() as hooks:
        hooks.pre(m, lambda _m, args: seen.append("pre")).post(m, lambda _m, a, out: seen.append("post"))
        assert len(hooks) == 2
        m(torch.zeros(1, 3))
    m(torch.zeros(1, 3))
    assert seen == ["pre", "post"]
    with pytest.raises(RuntimeError):
        with Hooks() as hooks:
            hooks.post(m, lambda _m, a, out: out * 0)
            assert torch.equal(m(torch.ones(1, 3)), torch.zeros(1, 2))
            raise RuntimeError("interrupted")
    assert not m._forward_hooks and not m._forward_pre_hooks
