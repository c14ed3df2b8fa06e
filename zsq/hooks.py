"""Forward hooks that live for one block: installed, then removed when the block ends, also on error.

    with Hooks() as hooks:
        for q in quants:
            hooks.pre(q, fn)        # register_forward_pre_hook
        hooks.post(block, fn)       # register_forward_hook
        model(x)

One helper for what was five copies of register / try / finally-remove.
"""
from __future__ import annotations

from typing import Callable, List

import torch.nn as nn


class Hooks:
    """The handles of the hooks installed through it; ``remove()`` (or leaving the block) drops them all."""

    def __init__(self) -> None:
        self._handles: List = []

    def pre(self, module: nn.Module, fn: Callable) -> "Hooks":
        self._handles.append(module.register_forward_pre_hook(fn))
        return self

    def post(self, module: nn.Module, fn: Callable) -> "Hooks":
        self._handles.append(module.register_forward_hook(fn))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
