"""Options as dataclass fields: what the command line and the Python API are generated from.

:func:`option` is a ``dataclasses.field`` whose metadata says how the option is shown: its help
line, the command line's kind (bool, int, float, str, path), flag, short flag, whether it
repeats, whether it is negatable, where its choices come from. :mod:`lrc.config` builds the
compress config from such fields, and a method's own settings class (:mod:`lrc.methods`) is
made of them too, so a new option anywhere is one field.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Callable


def option(default: Any = None, *, help: str, kind: str = "str", flag: str | None = None,
           short: str | None = None, factory: Callable | None = None, multiple: bool = False,
           negatable: bool = False, choices: Callable[[], list[str]] | None = None,
           metavar: str | None = None, cli: bool = True, why_not_cli: str = "",
           also: tuple = (), parse: Callable[[Any], Any] | None = None) -> Any:
    """A config field that is an option: ``help`` and the command line's ``kind`` (bool, int,
    float, str, path), ``flag`` (default ``--`` + the name with dashes), ``short``,
    ``multiple`` (repeatable and comma-separated), ``negatable`` (``--x/--no-x``; None lets
    the recipe decide), ``choices`` (the registry it takes its values from). ``cli=False``
    (with ``why_not_cli``): a Python-only option, such as a ready object. ``also``: Python
    types accepted besides the kind's (an int rank besides the command line's text);
    ``parse``: the canonical value of what was given (the command line's ``"8"`` -> ``8``)."""
    md = {"help": help, "kind": kind, "flag": flag, "short": short, "multiple": multiple,
          "negatable": negatable, "choices": choices, "metavar": metavar, "cli": cli,
          "why_not_cli": why_not_cli, "also": also, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


__all__ = ["option"]
