"""Progress bars and log lines, through Python's ``logging`` (the ``zsq`` logger and its children).

Library modules log to ``logging.getLogger(__name__)`` and configure no handler, as the ecosystem
does; the command line does (``cli_logging``): ``[zsq] message`` lines on stderr at INFO, WARNING
with ``--quiet``, DEBUG with ``-v``. Progress bars are tqdm on a terminal and a log line every 30 s
otherwise; they are hidden when the ``zsq`` logger is set above INFO
(``logging.getLogger("zsq").setLevel(logging.WARNING)``, what ``--quiet`` does).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterable, Iterator, Optional

from tqdm.auto import tqdm

ZSQ_LOGGER = "zsq"
CLI_FORMAT = "[zsq] %(message)s"
logger = logging.getLogger(__name__)


def bars_enabled() -> bool:
    """Progress is shown unless the ``zsq`` logger's own level is above INFO."""
    return logging.getLogger(ZSQ_LOGGER).level <= logging.INFO


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "", disable: bool = False,
             log_every: float = 30.0):
    """Wrap a loop: tqdm when stderr is a TTY, else one INFO line every ``log_every`` seconds.

    ``disable`` is for the caller's own reasons (a non-lead rank); the user's choice is the log level."""
    if disable or not bars_enabled():
        yield from iterable
        return
    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
        return
    start = last = time.time()
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.time()
        if now - last >= log_every:
            last = now
            logger.info("%s: %d%s (%.0fs)", desc, i, f"/{total}" if total else "", now - start)


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (pytest and tqdm swap it), never closes it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@contextlib.contextmanager
def cli_logging(level: int) -> Iterator[None]:
    """The command line's logging for one command: ``[zsq] ...`` on stderr from ``level`` up.

    Only entry points call this; the ``zsq`` logger's level, handlers and propagation are restored
    when the block ends (tests call the CLI's main() many times in one process)."""
    log = logging.getLogger(ZSQ_LOGGER)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(CLI_FORMAT))
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate
