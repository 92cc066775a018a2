"""What the data path should hold, as plain values: the programmer's input (built by
lb/policy.py) and the Maglev ring a VIP spec makes. Pure: no maps are read or written here,
so policy, explain and tests can use it without loading anything."""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Mapping, Optional

from . import maglev
from .layout import IPAddress, addr_words, family_of


@dataclass(frozen=True)
class BackendSpec:
    address: IPAddress
    weight: int = 1
    in_ring: bool = True      # takes new flows
    keep_flows: bool = True   # flows already on it stay (active or draining)
    nexthop: str = ""         # key into the next-hop MAC table
    server_id: int = 0        # QUIC VIPs: the server ID in its connection IDs (0: none)


@dataclass(frozen=True)
class QuicSpec:
    """A QUIC VIP's connection-ID layout (QUIC-LB plaintext)."""

    sid_len: int = 2          # bytes of server ID after the first octet
    cid_len: int = 8          # length of the connection IDs its servers issue


@dataclass(frozen=True)
class VipSpec:
    address: IPAddress
    port: int
    proto: int
    backends: tuple[BackendSpec, ...] = ()
    hash_src_only: bool = False
    ring_size: int = 65537
    quic: Optional[QuicSpec] = None  # a QUIC VIP (UDP): short headers routed by CID

    @property
    def ident(self) -> tuple:
        return (self.address, self.port, self.proto)


def backend_key(addr: IPAddress) -> bytes:
    """Maglev identity of a backend: its address words and family (20 bytes)."""
    return array.array("I", list(addr_words(addr)) + [family_of(addr)]).tobytes()


def ring_for(spec: VipSpec, bids: Mapping[IPAddress, int]) -> array.array:
    """The ring of `spec` as backend ids, `bids` giving each backend's id."""
    members = sorted((b for b in spec.backends if b.in_ring and b.weight > 0),
                     key=lambda b: backend_key(b.address))
    holders = [maglev.Slotholder(backend_key(b.address), b.weight) for b in members]
    return maglev.build(holders, spec.ring_size, [bids[b.address] for b in members])
