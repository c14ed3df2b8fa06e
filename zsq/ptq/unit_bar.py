"""One progress bar per reconstruction unit that shows the current loss.

zsq.progress.progress wraps an iterable and cannot show a changing value, so this adapter does the
same three things with a loss attached: a tqdm bar (with a ``loss=`` postfix) on a terminal, a log line
every ``log_every`` seconds otherwise, nothing when the ``zsq`` logger is set above INFO.
"""
from __future__ import annotations

import logging
import sys
import time

from zsq.progress import bars_enabled

logger = logging.getLogger(__name__)


class UnitBar:
    def __init__(self, total: int, desc: str, log_every: float = 30.0):
        self.total, self.desc, self.log_every = total, desc, log_every
        self.shown = bars_enabled()  # read once: a bar per unit, as the level was when it began
        self._bar = None
        self._start = self._last = time.time()
        self.n = 0

    def __enter__(self) -> "UnitBar":
        if self.shown and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, leave=False, dynamic_ncols=True)
        return self

    def update(self, loss: float) -> None:
        self.n += 1
        if not self.shown:
            return
        if self._bar is not None:
            self._bar.update(1)
            if self.n % 25 == 0 or self.n == self.total:
                self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            return
        now = time.time()
        if now - self._last >= self.log_every:
            self._last = now
            logger.info("%s: %d/%d loss %.4g (%.0fs)", self.desc, self.n, self.total, loss, now - self._start)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
