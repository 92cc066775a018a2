"""Config file text for the tests that parse one: an [lb] table, other top-level tables
([health], [announce]), [[vip]] tables with their [vip.health] and [[vip.backend]]
tables. Values are written with the lab's toml_value (strings unescaped)."""

from __future__ import annotations

from typing import Optional, Sequence

from lb.lab.instance import toml_value


def keys(**values) -> str:
    """`key = value` lines, in the order given."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())


def lb(interface: str = "eth0", **values) -> str:
    return f'\n[lb]\ninterface = "{interface}"\n' + keys(**values)


def section(name: str, **values) -> str:
    """A top-level table such as [health] or [announce]."""
    return f"\n[{name}]\n" + keys(**values)


def backend(address: str, **values) -> str:
    return f'\n[[vip.backend]]\naddress = "{address}"\n' + keys(**values)


def vip(name: str, address: str, port: int = 80, backends: Sequence[str] = ("10.1.0.11",),
        health: Optional[dict] = None, **values) -> str:
    """A [[vip]] table; `backends` are addresses, or backend() text for more keys."""
    text = f'\n[[vip]]\nname = "{name}"\naddress = "{address}"\nport = {port}\n'
    text += keys(**values)
    if health:
        text += "[vip.health]\n" + keys(**health)
    return text + "".join(b if b.startswith("\n[[") else backend(b) for b in backends)


MINIMAL = lb() + vip("web", "192.0.2.10")  # one VIP, one backend
