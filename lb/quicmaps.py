"""The data path's QUIC maps (bpf/quic.h) as plain values: which backend each server ID of
a QUIC VIP names (`quic_servers`), and the filter that tells the data path which
server-ID lengths a QUIC VIP at a UDP packet's destination may use (`quic_filter`).

What goes in them is decided by lb/programmer.py; `routes_of` (pure) says what one VIP
spec wants there.
"""

from __future__ import annotations

import ctypes
import errno
import socket
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

from . import layout
from .errors import BpfError, XdplbError
from .flowhash import FLOW_HASH_SEED, PREFILTER_MULT
from .layout import IPAddress


class QuicRoute(NamedTuple):
    """A key of `quic_servers`: a QUIC VIP's address and port, its server-ID length and
    one server ID."""

    address: IPAddress
    port: int
    sid_len: int
    server_id: int

    @property
    def filter_entry(self) -> tuple:
        return (self.address, self.port, self.sid_len)


class QuicTarget(NamedTuple):
    """A value of `quic_servers`."""

    backend_id: int
    vip_id: int
    cid_len: int


def routes_of(spec, bids: Mapping[IPAddress, int], vip_id: int) -> dict[QuicRoute, QuicTarget]:
    """What `quic_servers` holds for VIP `spec` (a VipSpec), `bids` giving each backend's
    id: one entry per backend with a server ID, none unless the VIP is a QUIC VIP."""
    q = spec.quic
    if q is None:
        return {}
    return {QuicRoute(spec.address, spec.port, q.sid_len, b.server_id):
            QuicTarget(bids[b.address], vip_id, q.cid_len)
            for b in spec.backends if b.server_id}


def filter_index(addr: IPAddress, port: int) -> int:
    """bpf/quic.h's quic_filter_index for a VIP address and port (0..65535)."""
    w = layout.addr_words(addr)
    folded = w[0] ^ w[1] ^ w[2] ^ w[3]
    return (((folded ^ layout.port_be(port)) * PREFILTER_MULT) & 0xFFFFFFFF) >> 16


def cid_hash(cid: bytes) -> int:
    """bpf/quic.h's quic_cid_hash: the hash a packet routed by connection ID `cid` gets
    (its GUE source port, its IPv6 flow label), from the ID's first 8 bytes."""
    w = int.from_bytes(cid[:8].ljust(8, b"\0"), "little")
    return (((w ^ FLOW_HASH_SEED) * 0x9E3779B97F4A7C15) & (1 << 64) - 1) >> 32


def server_key(r: QuicRoute) -> layout.QuicServerKey:
    k = layout.QuicServerKey(port=layout.port_be(r.port), family=layout.family_of(r.address),
                             sid_len=r.sid_len, server_id=r.server_id)
    k.addr[:] = layout.addr_words(r.address)
    return k


class QuicMaps:
    """Typed writes and reads of the maps of a Datapath `dp`."""

    def __init__(self, dp):
        self.servers = dp.maps["quic_servers"]
        self.filter = dp.maps["quic_filter"]
        self.epoch = dp.maps["quic_epoch"]  # of the CPUs' caches

    def apply(self, items: list, write: Callable) -> None:
        """write(item) for each of `items`, each dropped from the list once written (what
        an apply that raised leaves there is what it did not do); then a new epoch, so
        no CPU's quic_cache serves an entry it cached before."""
        if not items:
            return
        try:
            while items:
                write(items[0])
                del items[0]
        finally:
            raw = self.epoch.lookup(ctypes.c_uint32(0))
            now = ctypes.c_uint32.from_buffer_copy(raw).value if raw else 0
            self.epoch.update(ctypes.c_uint32(0), ctypes.c_uint32((now + 1) & 0xFFFFFFFF))

    def set_server(self, r: QuicRoute, t: QuicTarget) -> None:
        try:
            self.servers.update(server_key(r), layout.QuicServer(
                backend_id=t.backend_id, vip_id=t.vip_id, cid_len=t.cid_len))
        except BpfError as e:
            if e.errno != errno.E2BIG:
                raise
            # new server IDs go in before the old ones leave (no packet finds neither)
            raise XdplbError(
                f"quic_servers is full ({self.servers.max_entries} entries, lb.max_backends)"
                f" while old and new server IDs are held side by side: raise "
                f"lb.max_backends, or change fewer server IDs at once") from None

    def delete_server(self, r: QuicRoute) -> None:
        self.servers.delete(server_key(r))

    def entries(self) -> Iterator[tuple[QuicRoute, QuicTarget]]:
        for raw_k, raw_v in self.servers.items():
            k, v = layout.QuicServerKey.unpack(raw_k), layout.QuicServer.unpack(raw_v)
            addr = layout.words_addr(k.addr, k.family)
            yield (QuicRoute(addr, socket.ntohs(k.port), k.sid_len, k.server_id),
                   QuicTarget(v.backend_id, v.vip_id, v.cid_len))

    def set_filter(self, wanted: Iterable[tuple], touched: Iterable[tuple] = ()) -> None:
        """Make the filter words of `wanted` and `touched` (address, port, server-ID
        length) hold exactly the lengths of `wanted`."""
        wanted = set(wanted)
        words: dict[int, int] = {}
        for addr, port, sid_len in wanted | set(touched):
            idx = filter_index(addr, port)
            words.setdefault(idx >> 4, 0)
            if (addr, port, sid_len) in wanted:
                words[idx >> 4] |= 1 << ((idx & 15) * 4 + sid_len - 1)
        for w, bits in sorted(words.items()):
            self.filter.update(ctypes.c_uint32(w), ctypes.c_uint64(bits))
