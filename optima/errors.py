"""Option errors: the one exception a bad option value raises, naming the option (a leaf module: it
imports nothing of optima, so the options of every module can use it)."""

from __future__ import annotations


class OptionError(ValueError):
    """A bad option value; the message names the option and what it accepts."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option, self.reason = option, reason


def check_choice(option: str, value: object, allowed: tuple) -> None:
    """Raise ``OptionError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise OptionError(option, f"got {value!r}; choose from {', '.join(map(repr, allowed))}")
