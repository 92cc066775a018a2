"""Reading TOML into typed values while collecting problems: the decoder's syntax errors
and one typed table at a time (`Table`), each problem one line naming its key. The schema
that uses it is lb/config.py."""

from __future__ import annotations

import datetime
import difflib
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

if sys.version_info >= (3, 14):
    import tomllib
else:  # tomli: the same parser, and its errors carry lineno/colno (tomllib's from 3.14)
    import tomli as tomllib

from . import configread
from .errors import ConfigError
from .valuecheck import (IPAddress, fmt, ifname_problem, is_prime, listen_problem, next_prime,
                         parse_address, prev_prime)

MISSING: Any = object()

SUN_PATH_MAX = 107  # Unix socket paths: at most 107 bytes (+ NUL)

KIND_ARTICLES = {"string": "a string", "integer": "an integer", "number": "a number",
                 "boolean": "a boolean", "table": "a table", "array": "an array"}

# TOML value types by name; bool before int, datetime before date (subclasses first)
_KINDS = ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
          (dict, "table"), (list, "array"), (datetime.datetime, "datetime"),
          (datetime.date, "date"), (datetime.time, "time"))


def kind_of(value: Any) -> str:
    return next((name for cls, name in _KINDS if isinstance(value, cls)),
                type(value).__name__)


def is_kind(value: Any, kind: str) -> bool:
    actual = kind_of(value)
    return actual == kind or (kind == "number" and actual in ("integer", "float"))


def read_text(p: Path) -> str:
    """The file's text (read until it holds still: see configread); ConfigError with one
    line naming the path when it cannot be read, is too large, keeps changing or is not
    UTF-8."""
    try:
        data = configread.read_stable(p)
    except OSError as e:
        raise ConfigError([read_problem(p, e)]) from None
    except configread.TooLarge:
        raise ConfigError([f"{bare(str(p))}: larger than {configread.MAX_BYTES >> 20} MiB: "
                           f"this is not an xdplb config"]) from None
    except configread.Unstable:
        raise ConfigError([f"{bare(str(p))}: kept changing while being read; replace it "
                           f"atomically (write a new file, then rename it over this one)"]
                          ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        problem = f"{bare(str(p))}: not UTF-8 text (bad byte at offset {e.start})"
        raise ConfigError([problem]) from None


def parse_toml(text: str) -> dict:
    """The document as a dict; ConfigError with one line (where, what) when it is not
    TOML, or too deep to parse safely."""
    problem = configread.shape_problem(text)
    if problem:
        raise ConfigError([problem])
    try:
        return tomllib.loads(text.lstrip("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([syntax_problem(e)]) from None
    except RecursionError:
        raise ConfigError(["syntax error: values nested too deeply"]) from None
    except ValueError as e:  # int() beyond sys.get_int_max_str_digits()
        raise ConfigError([f"syntax error: a number is too long ({_lower(str(e)).split(';')[0]})"]
                          ) from None


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def syntax_problem(e: "tomllib.TOMLDecodeError") -> str:
    """The decoder's message at the position it carries."""
    what = e.msg[:1].lower() + e.msg[1:]
    if e.pos >= len(e.doc):
        return f"syntax error at end of file: {what}"
    return f"syntax error at line {e.lineno}, column {e.colno}: {what}"


def read_problem(p: Path, e: OSError) -> str:
    path = bare(str(p))
    if isinstance(e, FileNotFoundError):
        return f"{path}: no such file"
    if isinstance(e, IsADirectoryError):
        return f"{path}: is a directory, not a config file"
    if isinstance(e, PermissionError):
        return f"{path}: permission denied (cannot read the config)"
    return f"{path}: cannot read: {e.strerror or e}"


class Table:
    """One TOML table: typed reads that record problems under a label (`where`: the VIP or
    backend, `prefix`: the key path inside it), and the set of keys it knows."""

    def __init__(self, data: dict, problems: list[str], where: str = "", prefix: str = ""):
        self.data = data
        self.problems = problems
        self.where = where
        self.prefix = prefix
        self.known: set[str] = set()

    def _lead(self) -> str:
        return f"{self.where}: " if self.where else ""

    def report(self, key: str, message: str) -> None:
        self.problems.append(f"{self._lead()}{self.prefix}{key}: {message}")

    def note(self, message: str) -> None:
        self.problems.append(f"{self._lead()}{message}")

    def raw(self, key: str, kind: str, required: bool = False) -> Any:
        """The value if present and of the right kind, else MISSING (reported)."""
        self.known.add(key)
        if key not in self.data:
            if required:
                self.report(key, "required key is missing")
            return MISSING
        value = self.data[key]
        if not is_kind(value, kind):
            self.report(key, f"expected {KIND_ARTICLES[kind]}, got {kind_of(value)}")
            return MISSING
        return value

    def string(self, key: str, default: Optional[str] = None, required: bool = False
               ) -> Optional[str]:
        value = self.raw(key, "string", required)
        if value is MISSING:
            return default
        if "\0" in value:
            self.report(key, "contains a NUL character")
            return default
        return value

    def integer(self, key: str, default: Optional[int], lo: int, hi: Optional[int] = None,
                required: bool = False) -> Optional[int]:
        value = self.raw(key, "integer", required)
        if value is MISSING:
            return default
        if hi is None and value < lo:
            self.report(key, f"{value} must be at least {lo}")
            return default
        if hi is not None and not lo <= value <= hi:
            self.report(key, f"{value} out of range {lo}..{hi}")
            return default
        return value

    def positive(self, key: str, default: float) -> float:
        """A finite number > 0 (integers accepted), returned as float."""
        value = self.raw(key, "number")
        if value is MISSING:
            return default
        if not math.isfinite(value) or value <= 0:
            self.report(key, f"{fmt(value)} must be a positive number of seconds")
            return default
        return float(value)

    def seconds(self, key: str, default: float, hi: float) -> float:
        """A finite number of seconds in 0..hi (integers accepted), returned as float."""
        value = self.raw(key, "number")
        if value is MISSING:
            return default
        if not math.isfinite(value) or not 0 <= value <= hi:
            self.report(key, f"{fmt(value)} must be a number of seconds in 0..{fmt(hi)}")
            return default
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, "boolean")
        return default if value is MISSING else value

    def choice(self, key: str, default: str, allowed: Sequence[str]) -> str:
        value = self.raw(key, "string")
        if value is MISSING:
            return default
        if value not in allowed:
            self.report(key, f"{fmt(value)} is not one of: {', '.join(allowed)}")
            return default
        return value

    def address(self, key: str, required: bool = False, version: Optional[int] = None
                ) -> Optional[IPAddress]:
        value = self.raw(key, "string", required)
        if value is MISSING:
            return None
        problem, addr = parse_address(value, version)
        if problem:
            self.report(key, problem)
        return addr

    def table(self, key: str) -> Optional[dict]:
        """A sub-table, or None when absent or not a table (reported)."""
        value = self.raw(key, "table")
        return None if value is MISSING else value

    def tables(self, key: str, spelled: str) -> Optional[list]:
        """An array of tables ([[spelled]]), or None when absent or malformed (reported)."""
        self.known.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, dict):
            self.report(key, f"expected an array of tables, got a table (write [[{spelled}]], "
                             f"not [{spelled}])")
            return None
        if not isinstance(value, list):
            self.report(key, f"expected an array of tables ([[{spelled}]]), got "
                             f"{kind_of(value)}")
            return None
        return value

    def checked(self, key: str, problem_of: Callable[[str], Optional[str]],
                required: bool = False) -> Optional[str]:
        """A string that `problem_of` (text -> problem or None) accepts, else None."""
        text = self.string(key, required=required)
        if text is None:
            return None
        problem = problem_of(text)
        if problem:
            self.report(key, problem)
            return None
        return text

    def interface(self, key: str, required: bool = False) -> Optional[str]:
        """A Linux interface name (not checked against the machine)."""
        return self.checked(key, ifname_problem, required)

    def path(self, key: str, default: str) -> str:
        """A non-empty path."""
        path = self.string(key, default)
        if path == "":
            self.report(key, "must not be empty")
            return default
        return path

    def prime(self, key: str, default: int, lo: int, hi: int) -> int:
        size = self.integer(key, None, lo, hi)
        if size is None:
            return default
        if not is_prime(size):
            self.report(key, f"{size} is not prime (nearest primes: "
                             f"{prev_prime(size)}, {next_prime(size)})")
            return default
        return size

    def socket_path(self, key: str, default: str) -> str:
        """A Unix socket path (short enough for sun_path)."""
        path = self.path(key, default)
        if len(path.encode()) > SUN_PATH_MAX:
            self.report(key, f"path is {len(path.encode())} bytes long; a Unix socket path "
                             f"holds at most {SUN_PATH_MAX}")
            return default
        return path

    def listen(self, key: str) -> Optional[str]:
        """HOST:PORT or [V6]:PORT to listen on, or None."""
        return self.checked(key, listen_problem)

    def url_path(self, key: str) -> Any:
        """An absolute URL path, or MISSING."""
        path = self.string(key, MISSING)
        if path is MISSING:
            return MISSING
        if not path.startswith("/") or any(c.isspace() or ord(c) < 32 or ord(c) == 127
                                            for c in path):
            self.report(key, f"{fmt(path)} must start with '/' and contain no spaces or "
                             f"control characters")
            return MISSING
        return path

    def finish(self) -> None:
        """Report every key this table was not asked about."""
        for key in self.data:
            if key not in self.known:
                self.note(f"unknown key {self.prefix}{key_text(key)}{suggest(key, self.known)}")


_BARE = re.compile(r"[A-Za-z0-9_-]+")


def key_text(key: str) -> str:
    """A key as TOML would spell it: bare when possible, else quoted."""
    return key if _BARE.fullmatch(key) else fmt(key)


def bare(text: str) -> str:
    """Text for a label: as is when printable without spaces, else quoted."""
    return text if text.isprintable() and not any(c.isspace() for c in text) else fmt(text)


def suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
