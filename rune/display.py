"""Text shown to an operator (CLI tables, logs, the dashboard) with control characters escaped,
so an argv can neither move the cursor, recolour the screen nor forge a row."""

from __future__ import annotations

from collections.abc import Iterable

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(text: str) -> str:
    """`text` with every non-printable character written as an escape (`\\n`, `\\x1b`)."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def command_line(argv: Iterable[str]) -> str:
    """An argv for display: words escaped, joined by spaces."""
    return " ".join(printable(a) for a in argv)
