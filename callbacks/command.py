"""The ``optima`` console script's first lines: SIGINT and SIGTERM are caught before the slow imports
(torch, Lightning, transformers), so a command interrupted at any moment prints one line, never a
traceback, and exits with 128 + the signal's number (130, 143). ``optima.callbacks.cli`` does the rest.
"""

from __future__ import annotations

import sys

from optima.callbacks.signals import Interrupted, interruptible


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
