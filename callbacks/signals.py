"""SIGINT and SIGTERM as an exception: within ``interruptible()`` either signal raises ``Interrupted``, which
reports itself on one line (the ``optima`` command's interruptions; a leaf module, no slow imports)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A ``BaseException``: Lightning cleans up and re-raises it, as it does
    any error, instead of handling it as its own ``KeyboardInterrupt``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def report(self, what: str) -> int:
        """Print ``optima: interrupted (SIGNAL) WHAT`` on one line; return the exit status, 128 + the signal."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut the line short
        print(f"optima: interrupted ({self}) {' '.join(what.split())}", file=sys.stderr, flush=True)
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise ``Interrupted``; the previous handlers come back after it."""
    previous = {signum: signal.signal(signum, _raise) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
