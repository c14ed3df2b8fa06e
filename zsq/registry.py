"""One name -> value table for every registry in zsq (models, presets, synthesizers, methods, block types).

A leaf module: it imports nothing from zsq but the errors. Each package owns its Registry and its
``__init__`` imports the modules that fill it, so a list always comes from the registry, never from
a hand-written tuple. Same behaviour everywhere: registering a taken name with a different value is an
error (a silent overwrite would change what a name means), an unknown name is a ZsqError that says
what is close and what exists.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Dict, Generic, Iterator, List, TypeVar

from zsq.errors import ZsqError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named values of one kind. ``kind`` names them in errors ("method", "synthesis method" ...);
    ``hint`` is appended to the unknown-name error (e.g. where else names come from)."""

    def __init__(self, kind: str, hint: str = ""):
        self.kind = kind
        self.hint = hint
        self._items: Dict[str, T] = {}

    def register(self, name: str, value: T) -> T:
        """Add ``value`` under ``name``; the same value again is a no-op, another value is an error."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        if name in self._items and self._items[name] != value:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = value
        return value

    def get(self, name: str) -> T:
        """The value for ``name``; ZsqError with close matches and every known name when unknown."""
        if isinstance(name, str) and name in self._items:
            return self._items[name]
        close = difflib.get_close_matches(str(name), list(self._items), n=4, cutoff=0.5)
        did_you_mean = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ZsqError(f"unknown {self.kind} {name!r}.{did_you_mean} "
                       f"Choose one of: {', '.join(self.names())}{self.hint}")

    def names(self, pattern: str = "*") -> List[str]:
        """Sorted names matching a shell-style pattern."""
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def items(self) -> Dict[str, T]:
        """A sorted copy of the table."""
        return {n: self._items[n] for n in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
