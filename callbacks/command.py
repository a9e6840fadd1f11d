"""The ``optima`` console script's first lines: SIGINT and SIGTERM are caught before the slow imports
(torch, Lightning, transformers), so a command interrupted at any moment prints one line, never a
traceback, and exits with 128 + the signal's number (130, 143). ``optima.callbacks.cli`` does the rest.
"""

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


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``optima`` console script."""
    with interruptible():
        try:
            from optima.callbacks.cli import main as run
        except Interrupted as stop:
            sys.exit(stop.report("while starting: nothing was read or written"))
        run(args)


if __name__ == "__main__":
    main()
