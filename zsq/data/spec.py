"""Data specs: a path with an optional ``[START:STOP]`` slice, e.g. ``test.npz[1017:2041]``.

The slice lets users take real calibration images disjoint from the evaluation ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from zsq.errors import ZsqError

_SLICE = re.compile(r"^(?P<path>.*)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


@dataclass(frozen=True)
class DataSpec:
    path: Path
    start: Optional[int] = None
    stop: Optional[int] = None

    @property
    def sliced(self) -> bool:
        return self.start is not None or self.stop is not None

    def __str__(self) -> str:
        if not self.sliced:
            return str(self.path)
        s = "" if self.start is None else self.start
        e = "" if self.stop is None else self.stop
        return f"{self.path}[{s}:{e}]"


def parse_spec(spec: Union[str, Path]) -> DataSpec:
    """Split ``PATH[START:STOP]`` (either bound optional); a path that exists as written wins."""
    text = str(spec)
    if not text:
        raise ZsqError("empty data path")
    m = _SLICE.match(text)
    if m is None or Path(text).exists():
        return DataSpec(Path(text).expanduser())
    start = int(m["start"]) if m["start"] else None
    stop = int(m["stop"]) if m["stop"] else None
    return DataSpec(Path(m["path"]).expanduser(), start, stop)
