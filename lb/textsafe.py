"""Text from users (config values, keys, paths, CLI arguments) made safe to echo: every
character that does not print (C0 and C1 controls, DEL, line and paragraph separators,
unassigned code points) becomes a visible escape, so a message can neither break a log line
nor hide or rewrite text on a terminal."""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _one(c: str) -> str:
    if c.isprintable() or c == " ":
        return c
    if c in _NAMED:
        return _NAMED[c]
    n = ord(c)
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def escape(text: str) -> str:
    return text if text.isprintable() else "".join(_one(c) for c in text)
