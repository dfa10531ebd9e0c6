"""The two kinds of error a user sees as one line (`error: ...`, exit status 2), and how a user's value
is shown in them: never more than one line, never more than SHOWN_CHARACTERS of it, never a file's
contents. Every other module raises these; `utils.run_script` prints them."""

from __future__ import annotations

from typing import Any

SHOWN_CHARACTERS = 200


class ConfigError(ValueError):
    """A configuration problem; the message names the key path and what was expected (`keys`, when
    the problem is one key's: its path, section by section)."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = keys


class UserError(RuntimeError):
    """A problem with the user's input (missing folder, unwritable output...): one line, exit 2."""


def shown(value: Any, limit: int = SHOWN_CHARACTERS) -> str:
    r"""`repr(value)` on one line, cut to `limit` characters: what an error may show of a user's value.

    Examples
    --------
    >>> shown("x" * 300).endswith("… (302 chars)")
    True
    >>> print(shown("two\nlines"))
    'two\nlines'
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"
