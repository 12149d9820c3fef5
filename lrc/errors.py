"""Errors meant for the user: the CLI prints them as one line and exits non-zero.

A message names an option of lrc with :func:`opt` (``f"{opt('calib_tokens')} must be
positive"``), never as a CLI flag or a Python keyword: the one who shows the message decides how
the option is written. Python (the default) writes ``calib_tokens`` (``calib_tokens=0`` with
a value); the CLI installs its flag names with :func:`set_option_style` (``--calib-tokens``,
``--calib-tokens 0``), from the one table that maps config fields to flags (:mod:`lrc.config`).
"""

from __future__ import annotations

import re
from typing import Callable

_MARK, _SEP = "\x1f", "\x1e"
_MARKED = re.compile(f"{_MARK}([A-Za-z0-9_.]+)(?:{_SEP}([^{_MARK}]*))?{_MARK}")

Style = Callable[[str, "str | None"], str]  # (field name, value or None) -> text


def _keyword(name: str, value: str | None) -> str:
    return f"{name}={value}" if value is not None else name


_style: list[Style] = [_keyword]


def opt(name: str, value: object = None) -> str:
    """An option (a config field) inside a message, with the value given to it if any: written
    by the current style when the message is shown (``calib_tokens=0`` in Python,
    ``--calib-tokens 0`` on the command line)."""
    return f"{_MARK}{name}{'' if value is None else _SEP + str(value)}{_MARK}"


def render(text: str, style: Style | None = None) -> str:
    """``text`` with every :func:`opt` mark written in ``style`` (default: the current one)."""
    if _MARK not in text:
        return text
    how = style or _style[0]
    return _MARKED.sub(lambda m: how(m.group(1), m.group(2)), text)


def set_option_style(style: Style | None) -> None:
    """How options are written in messages from now on (None: Python keywords)."""
    _style[0] = style or _keyword


class LrcError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2

    def __str__(self) -> str:
        return render(super().__str__())

    def render(self, style: Style | None = None) -> str:
        """The message with its options written in ``style``."""
        return render(super().__str__(), style)


class ConfigError(LrcError):
    """A bad option: ``field`` names the config field it is about."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
