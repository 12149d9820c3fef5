"""Errors meant for the user: the CLI prints them as one line and exits non-zero."""


class LrcError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2
