"""File names and messages as text that JSON and a terminal can carry unchanged in meaning.

`display_name` turns a file name's bytes that are not UTF-8 into `\\xNN` (valid Unicode, for
JSON); `printable` also escapes control and format characters (ESC, CR, a bidi override), so a
name cannot move the cursor or restyle a terminal; `one_line` fits a library's message on one
printable line. Used by predict's table, the usage errors and serve. Cases: docs/faults.md.
"""
from __future__ import annotations

import unicodedata

MAX_MESSAGE = 300  # characters of a loader's own error kept in a one-line usage error
UNPRINTABLE = ("Cc", "Cf", "Zl", "Zp", "Cs")  # Unicode categories escaped on a terminal


def display_name(name: str) -> str:
    """`name` as valid Unicode text: bytes of a file name that are not UTF-8 (Python keeps them as
    lone surrogates) become `\\xNN`, so JSON and terminals can carry it."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to: escape it as is
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """`text` safe on a terminal: display_name's escaping, then control and format characters
    as `\\x1b`, `\\r`, `\\u202e`."""
    return "".join(ascii(ch)[1:-1] if unicodedata.category(ch) in UNPRINTABLE else ch
                   for ch in display_name(text))


def one_line(text: object, limit: int = MAX_MESSAGE) -> str:
    """A library's message on one printable line, cut to `limit` characters."""
    text = printable(" ".join(str(text).split()))
    return text if len(text) <= limit else text[:limit - 1] + "…"
