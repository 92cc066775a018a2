"""Reading a config file defensively, before the TOML parser sees it.

- A file being rewritten in place is read until two reads a moment apart agree (size,
  mtime_ns and content), so a half-written file is never applied; one that keeps changing
  is refused. Operators should replace the file atomically (write a temp file, rename it
  over the config) and nothing here is ever needed.
- Size and shape limits: tomllib takes quadratic time and memory on deeply dotted keys
  (a 40 KB file took 7.7 s and 2.4 GB), so files over MAX_BYTES, keys of more than
  MAX_KEY_PARTS parts and nesting deeper than MAX_NESTING are refused before parsing."""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from pathlib import Path
from typing import Optional

MAX_BYTES = 4 << 20
MAX_KEY_PARTS = 32
MAX_NESTING = 32
SETTLE_S = 0.02   # between the two reads that must agree
READ_TRIES = 10

# strings and comments: their dots and brackets are not structure
_OPAQUE = re.compile(r'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|'
                     r"'[^'\n]*'|#[^\n]*", re.S)
# a run of dotted parts ends at these
_RUN = re.compile(r"[^=,\n\[\]{}]+")
_BRACKETS = re.compile(r"[\[\]{}]")


class Unstable(Exception):
    """The file kept changing while it was read."""


class TooLarge(Exception):
    pass


def _snapshot(p: Path) -> tuple[int, int, bytes]:
    # non-blocking open, regular files only: a FIFO must not hang a reload
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(p))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(p))
        if st.st_size > MAX_BYTES:
            raise TooLarge()
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise TooLarge()
    return st.st_size, st.st_mtime_ns, data


def read_stable(p: Path, settle: float = SETTLE_S, tries: int = READ_TRIES) -> bytes:
    """The file's bytes once two reads `settle` s apart agree. OSError as open/read
    raise it, TooLarge over MAX_BYTES, Unstable after `tries` disagreeing reads."""
    last = _snapshot(p)
    for _ in range(tries):
        time.sleep(settle)
        now = _snapshot(p)
        if now == last:
            return now[2]
        last = now
    raise Unstable()


def shape_problem(text: str) -> Optional[str]:
    """Why the text is too deep to hand to the parser, or None."""
    bare = _OPAQUE.sub("x", text)
    parts = max((run.count(".") + 1 for run in _RUN.findall(bare)), default=0)
    if parts > MAX_KEY_PARTS:
        return (f"a dotted key has {parts} parts (at most {MAX_KEY_PARTS}): "
                f"this is not an xdplb config")
    depth = deepest = 0
    for c in _BRACKETS.findall(bare):
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        return (f"arrays or tables nested {deepest} deep (at most {MAX_NESTING}): "
                f"this is not an xdplb config")
    return None
