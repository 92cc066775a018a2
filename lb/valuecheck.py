"""Checks of single configuration values: IP addresses, interface names, HOST:PORT,
primes. Each returns a one-line problem (or None) that names the value, for the reader in
lb/tomltable.py to file under its key."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Optional, Union

from .textsafe import escape

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

U32_MAX = (1 << 32) - 1
IFNAMSIZ = 16                 # Linux interface names: at most 15 bytes


def fmt(value: Any) -> str:
    """A value as it would appear in TOML, on one line."""
    if isinstance(value, str):
        return escape(json.dumps(value, ensure_ascii=False))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_address(text: str, version: Optional[int] = None
                  ) -> tuple[Optional[str], Optional[IPAddress]]:
    """(problem, address): exactly one of them is None."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        want = f"an IPv{version}" if version else "an IP"
        return f"{fmt(text)} is not {want} address", None
    if version and addr.version != version:
        return (f"{fmt(text)} is an IPv{addr.version} address, expected "
                f"IPv{version}"), None
    if getattr(addr, "scope_id", None):
        return f"{fmt(text)}: a zone index (%...) is not allowed here", None
    if addr.is_unspecified or addr.is_multicast or addr == ipaddress.IPv4Address(U32_MAX):
        return f"{fmt(text)} is not a usable unicast address", None
    return None, addr


_IFNAME_BAD = re.compile(r"[/:\s]")


def ifname_problem(name: str) -> Optional[str]:
    if not name:
        return "must not be empty"
    if len(name.encode()) >= IFNAMSIZ or _IFNAME_BAD.search(name) or name in (".", ".."):
        return (f"{fmt(name)} is not a valid interface name (at most {IFNAMSIZ - 1} "
                f"characters, no '/', ':' or spaces)")
    return None


def split_host_port(text: str) -> tuple[str, str]:
    """'host:port' or '[v6]:port' -> (host, port text); ValueError when not of that form."""
    m = re.fullmatch(r"\[([^\[\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not m:
        raise ValueError(text)
    return (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def listen_problem(text: str) -> Optional[str]:
    form = f"{fmt(text)} is not of the form HOST:PORT (e.g. 127.0.0.1:9733 or [::1]:9733)"
    try:
        host, port = split_host_port(text)
    except ValueError:
        return form
    if not 1 <= int(port) <= 65535:
        return f"{fmt(text)}: port {int(port)} out of range 1..65535"
    bracketed = text.startswith("[")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if bracketed or not _HOSTNAME.fullmatch(host):
            return f"{fmt(text)}: {fmt(host)} is neither an IP address nor a host name"
        return None
    if (addr.version == 6) != bracketed:
        return form
    return None


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0 or n % 3 == 0:
        return n in (2, 3)
    f = 5
    while f * f <= n:
        if n % f == 0 or n % (f + 2) == 0:
            return False
        f += 6
    return True


def next_prime(n: int) -> int:
    """The smallest prime > n."""
    n += 1
    while not is_prime(n):
        n += 1
    return n


def prev_prime(n: int) -> Optional[int]:
    """The largest prime < n, or None."""
    n -= 1
    while n >= 2 and not is_prime(n):
        n -= 1
    return n if n >= 2 else None
