"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise, nothing when quiet."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional

from tqdm.auto import tqdm


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "", quiet: bool = False,
             log_every: float = 30.0):
    """Wrap a loop: tqdm when stderr is a TTY, else one line every ``log_every`` seconds."""
    if quiet:
        yield from iterable
        return
    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
        return
    start = last = time.time()
    i = 0
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.time()
        if now - last >= log_every:
            last = now
            of = f"/{total}" if total else ""
            print(f"[zsq] {desc}: {i}{of} ({now - start:.0f}s)", file=sys.stderr, flush=True)


def log(msg: str, quiet: bool = False) -> None:
    """One status line on stderr (stdout stays clean for --json)."""
    if not quiet:
        print(f"[zsq] {msg}", file=sys.stderr, flush=True)
