"""Strict parsing of the numbers a client writes as text (versions, lengths, event ids).

`str.isdigit()` accepts "²" and other Unicode digits that `int()` then refuses (a 500), and
`int()` alone accepts signs, spaces, underscores and thousands of digits. A number on the
wire is one to `max_digits` ASCII digits, nothing else.
"""

from __future__ import annotations

from service.errors import InvalidRequest

ASCII_DIGITS = frozenset("0123456789")
MAX_DIGITS = 18  # every value below 10**18 fits a signed 64-bit integer


def parse_uint(text: str, *, name: str, max_digits: int = MAX_DIGITS) -> int:
    """The non-negative integer `text` spells in 1..max_digits ASCII digits.

    Raises InvalidRequest (400) naming `name` (such as "header Last-Event-ID") otherwise:
    no sign, no whitespace, no underscores, no non-ASCII digits, no empty text."""
    if not 1 <= max_digits <= 4300:  # 4300: Python's own int() limit for decimal text
        raise ValueError(f"max_digits must be in 1..4300, got {max_digits}")
    if (
        not isinstance(text, str)
        or not text
        or len(text) > max_digits
        or not ASCII_DIGITS.issuperset(text)
    ):
        shown = repr(text[:20] + "…") if isinstance(text, str) and len(text) > 20 else repr(text)
        raise InvalidRequest(
            f"{name} must be a non-negative whole number written with 1 to {max_digits} "
            f"ASCII digits 0-9 (no sign, spaces or other characters), got {shown}",
            param=name,
        )
    return int(text)
