"""The [[vip]] tables of xdplb's configuration and their [[vip.backend]]s: the schema of
one VIP, parsed and checked on its own (part of lb/config.py's schema; what needs every VIP
at once, or [lb], is checked there).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from .healthconfig import HealthSection, resolve_health
from .quicconfig import check_server_ids, read_quic
from .tomltable import Table, bare, kind_of
from .valuecheck import U32_MAX, IPAddress, fmt

PROTOCOLS = ("tcp", "udp")
PROTO_NUMBERS = {"tcp": 6, "udp": 17}
HASHES = ("5tuple", "src_ip")
ALL_DOWN = ("drop", "spread")
BACKEND_STATES = ("active", "drain", "maint")
WEIGHT_MAX = 65535


@dataclass(frozen=True)
class Backend:
    address: IPAddress
    weight: int = 1
    state: str = "active"
    server_id: Optional[int] = None  # QUIC VIPs: the server ID in its connection IDs


@dataclass(frozen=True)
class Vip:
    name: str
    address: IPAddress
    port: int                      # 0 = any port
    protocol: str = "tcp"
    hash: str = "5tuple"
    all_down: str = "drop"
    health: HealthSection = field(default_factory=HealthSection)
    backends: tuple[Backend, ...] = ()
    quic: bool = False             # UDP: QUIC short headers routed by connection ID
    quic_server_id_len: int = 2    # bytes of server ID after a CID's first octet
    quic_cid_len: int = 8          # length of the CIDs the VIP's servers issue

    @property
    def proto(self) -> int:
        """IP protocol number (6 or 17)."""
        return PROTO_NUMBERS[self.protocol]

    @property
    def ident(self) -> tuple[IPAddress, int, int]:
        """(address, port, IP protocol number): the data path's key for this VIP."""
        return (self.address, self.port, self.proto)

    @property
    def hash_src_only(self) -> bool:
        return self.hash == "src_ip"

    def backend(self, address: Union[str, IPAddress]) -> Optional[Backend]:
        """The backend with this address (any spelling), or None."""
        try:
            wanted = ipaddress.ip_address(address)
        except ValueError:
            return None
        return next((b for b in self.backends if b.address == wanted), None)


def _vip_label(data: Any, index: int) -> str:
    name = data.get("name") if isinstance(data, dict) else None
    return f"vip {fmt(name)}" if isinstance(name, str) and name else f"vip #{index}"


def parse_vips(items: list, health: HealthSection, problems: list[str]) -> list[Vip]:
    vips: list[Vip] = []
    for index, item in enumerate(items, 1):
        label = _vip_label(item, index)
        if not isinstance(item, dict):
            problems.append(f"{label}: expected a table ([[vip]]), got {kind_of(item)}")
            continue
        vip = _parse_vip(Table(item, problems, where=label), health)
        if vip is not None:
            vips.append(vip)
    return vips


def _parse_vip(t: Table, base_health: HealthSection) -> Optional[Vip]:
    name = t.string("name", required=True)
    if name is not None and (not name.strip() or any(ord(c) < 32 for c in name)):
        t.report("name", "must be non-empty text without control characters")
        name = None
    address = t.address("address", required=True)
    port = t.integer("port", None, 0, 65535, required=True)
    protocol = t.choice("protocol", "tcp", PROTOCOLS)
    hash_ = t.choice("hash", "5tuple", HASHES)
    all_down = t.choice("all_down", "drop", ALL_DOWN)
    quic = read_quic(t, protocol, port)
    health_table = Table(t.table("health") or {}, t.problems, where=t.where, prefix="health.")
    health = resolve_health(health_table, base_health, port)
    backends = _parse_backends(t)
    t.finish()
    if name is None or address is None or port is None or backends is None:
        return None
    check_server_ids(t, quic, backends)
    return Vip(name=name, address=address, port=port, protocol=protocol, hash=hash_,
               all_down=all_down, health=health, backends=tuple(backends), **quic)


def _parse_backends(t: Table) -> Optional[list[Backend]]:
    """The VIP's backends, or None when any of them is invalid."""
    items = t.tables("backend", "vip.backend")
    if items is None and "backend" in t.data:
        return None
    if not items:
        t.note("no backends (add at least one [[vip.backend]] with an address)")
        return None
    backends: list[Optional[Backend]] = []
    for index, item in enumerate(items, 1):
        label = _backend_label(t.where, item, index)
        if not isinstance(item, dict):
            t.problems.append(f"{label}: expected a table ([[vip.backend]]), got "
                              f"{kind_of(item)}")
            backends.append(None)
            continue
        backends.append(_parse_backend(Table(item, t.problems, where=label)))
    _check_duplicate_backends(t, backends)
    return None if None in backends else backends  # type: ignore[return-value]


def _backend_label(vip_label: str, data: Any, index: int) -> str:
    address = data.get("address") if isinstance(data, dict) else None
    return (f"{vip_label} backend {bare(address)}" if isinstance(address, str) and address
            else f"{vip_label} backend #{index}")


def _parse_backend(t: Table) -> Optional[Backend]:
    address = t.address("address", required=True)
    weight = t.integer("weight", 1, 0, WEIGHT_MAX)
    state = t.choice("state", "active", BACKEND_STATES)
    server_id = t.integer("server_id", None, 1, U32_MAX)
    t.finish()
    if address is None or (server_id is None and "server_id" in t.data):
        return None
    return Backend(address=address, weight=weight, state=state, server_id=server_id)


def _check_duplicate_backends(t: Table, backends: Sequence[Optional[Backend]]) -> None:
    seen: dict[IPAddress, int] = {}
    for index, backend in enumerate(backends, 1):
        if backend is None:
            continue
        first = seen.setdefault(backend.address, index)
        if first != index:
            t.note(f"backend {backend.address}: listed twice (backends #{first} and #{index})")
