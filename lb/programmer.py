"""Turn a desired state (VIPs, backends, next hops) into map contents, changing only what
differs, in an order that never lets a packet see a half-built state:

1. next-hop MACs, then backend entries that gain something (new, or may now keep flows);
2. each changed ring, filled completely in a new inner map and swapped in atomically
   (all of one apply in batches: the kernel waits an RCU grace period per update call);
3. VIP entries, then VIP addresses (vip_addrs, then the prefilter bit that makes them live);
4. only then what loses something: backend flags removed, backends and VIPs released.

Ids: a VIP gets an id (ring slot and counters), each VIP/backend pair a backend id. Freed
ids go to the back of a FIFO, so an id is reused as late as possible; the data path also
refuses a flow-table entry whose backend belongs to another VIP.
"""

from __future__ import annotations

import array
import collections
import hashlib
import socket
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

from . import layout as L
from .datapath import Datapath, EgressConfig
from .layout import IPAddress
from .specs import VipSpec, ring_for


RING_BATCH = 64  # rings held before a batched swap (memory vs. RCU waits)


@dataclass
class _Vip:
    vip_id: int
    spec: Optional[VipSpec]  # None: adopted from pinned maps, not yet reconciled
    ring: Optional[array.array] = None  # kept only with Programmer(keep_rings=True)
    digest: Optional[bytes] = None      # of the installed ring
    bids: dict = field(default_factory=dict)  # backend address -> backend id
    flags: dict = field(default_factory=dict)  # backend id -> written BE flags
    ring_id: int = 0                    # slot in `rings` of the installed ring
    ring_size: int = 0


@dataclass(frozen=True)
class InstalledVip:
    """What the maps hold for one VIP (a read-only view for stats, explain and tests)."""

    vip_id: int
    ring_id: int
    ring_size: int
    backends: Mapping[IPAddress, int]  # address -> backend id
    flows_stay: frozenset  # backends written with the flows-stay flag


@dataclass
class ApplyReport:
    vips_added: int = 0
    vips_removed: int = 0
    vips_changed: int = 0
    backends_added: int = 0
    backends_removed: int = 0
    rings_swapped: int = 0
    duration_s: float = 0.0


def _digest(ring: array.array) -> bytes:
    return hashlib.blake2b(ring.tobytes(), digest_size=16).digest()


class Programmer:
    def __init__(self, dp: Datapath, keep_rings: bool = True):
        """keep_rings=False keeps only a digest per ring (1,000 rings of 65537 slots
        would hold 256 MB in Python); the installed ring stays readable from the map."""
        self.dp = dp
        self.keep_rings = keep_rings
        self.vips: dict[tuple, _Vip] = {}
        self._free_vip = collections.deque(range(1, dp.limits.max_vips))
        self._free_ring = collections.deque(range(1, 2 * dp.limits.max_vips))
        self._free_be = collections.deque(range(1, dp.limits.max_backends))
        self._free_nh = collections.deque(range(1, dp.limits.max_nexthops))
        self.nexthops: dict[str, int] = {}
        self._gen: dict[int, int] = {}  # backend id -> generation (see struct backend)
        self._macs: dict[int, bytes] = {}
        self._egress: Optional[EgressConfig] = None
        self._tx_port: Optional[int] = None

    # --- ids -----------------------------------------------------------------------
    def _take(self, pool: collections.deque, what: str) -> int:
        if not pool:
            raise RuntimeError(f"out of {what} ids: raise the limit")
        return pool.popleft()

    def _nexthop_id(self, key: str) -> int:
        nid = self.nexthops.get(key)
        if nid is None:
            nid = self.nexthops[key] = self._take(self._free_nh, "next-hop")
        return nid

    # --- the one entry point -------------------------------------------------------
    def apply(self, vips: Sequence[VipSpec], macs: Mapping[str, bytes],
              egress: Optional[EgressConfig] = None) -> ApplyReport:
        """Make the maps hold `vips`, next-hop `macs` and (unless None) `egress`."""
        t0 = time.perf_counter()
        rep = ApplyReport()
        dp = self.dp
        if egress is not None:
            self._set_egress(egress)
        # every next hop gets its id now, resolved or not, so backend entries point at
        # it from the start and a MAC learnt later needs only the nexthops write
        for v in vips:
            for b in v.backends:
                self._nexthop_id(b.nexthop)
        for key, mac in macs.items():
            nid = self._nexthop_id(key)
            if self._macs.get(nid) != mac:
                dp.set_nexthop(nid, mac)
                self._macs[nid] = mac

        wanted = {v.ident: v for v in vips}
        old_addrs = {ident[0] for ident in self.vips}
        later: list = []  # releases, run after every swap
        self._rings: list = []  # (ring_id, ring) to swap in, in one batch
        self._after_rings: list = []  # VIP entries, written once their ring is in
        for ident, spec in wanted.items():
            cur = self.vips.get(ident)
            if cur is None:
                vid = self._take(self._free_vip, "VIP")
                dp.reset_counters("vip", vid)
                cur = self.vips[ident] = _Vip(vid, spec)
                rep.vips_added += 1
            elif cur.spec == spec:
                continue
            else:
                rep.vips_changed += 1
            self._apply_vip(cur, spec, rep, later)
        self._flush_rings()
        for ident in [i for i in self.vips if i not in wanted]:
            cur = self.vips.pop(ident)
            rep.vips_removed += 1
            dp.delete_vip(L.vip_key(*ident))
            later.append(lambda c=cur: self._release_vip(c))
        dp.set_vip_addrs({v.spec.address for v in self.vips.values()}, old_addrs)
        for fn in later:
            fn()
        rep.duration_s = time.perf_counter() - t0
        return rep

    def _set_egress(self, egress: EgressConfig) -> None:
        if (egress.tx_port is None) != (egress.tx_mode == L.TX_XDP_TX):
            raise ValueError("egress: tx_port is the XDP_REDIRECT target, and only that")
        # the port first: never a redirect to an empty slot
        if egress.tx_port is not None and egress.tx_port != self._tx_port:
            self.dp.set_tx_port(egress.tx_port)
            self._tx_port = egress.tx_port
        if egress != self._egress:
            self.dp.set_config(egress)
            self._egress = egress

    def _apply_vip(self, cur: _Vip, spec: VipSpec, rep: ApplyReport, later: list) -> None:
        dp = self.dp
        first = cur.digest is None
        new_bids: dict = {}
        demote: list = []
        for b in spec.backends:
            bid = cur.bids.get(b.address)
            if bid is None:
                bid = self._take(self._free_be, "backend")
                dp.reset_counters("backend", bid)
                rep.backends_added += 1
            new_bids[b.address] = bid
            flags = L.BE_F_FLOWS_STAY if b.keep_flows else 0
            nid = self.nexthops.get(b.nexthop, 0)
            entry = (flags, nid)
            if cur.flags.get(bid) == entry:
                continue
            old = cur.flags.get(bid)
            if old is not None and old[0] & ~flags:
                # loses FLOWS_STAY: after the swap, and in a new generation, so no stale
                # copy of one of its flow entries (another CPU's cache) is honoured again
                demote.append((b, bid, flags, nid))
            else:
                dp.set_backend(bid, b.address, cur.vip_id, nid, flags, self._gen.get(bid, 0))
            cur.flags[bid] = entry
        ring = ring_for(spec, new_bids)
        digest = _digest(ring)
        old_ring_id = cur.ring_id
        if digest != cur.digest:
            if not cur.ring_id or len(ring) != cur.ring_size:
                # a new size goes to a new slot; the VIP entry switches id and size at once
                cur.ring_id, cur.ring_size = self._take(self._free_ring, "ring"), len(ring)
                if old_ring_id:
                    later.append(lambda r=old_ring_id: self._release_ring(r))
            self._rings.append((cur.ring_id, ring))
            if len(self._rings) >= RING_BATCH:
                self._flush_rings()
            cur.digest = digest
            cur.ring = ring if self.keep_rings else None
            rep.rings_swapped += 1
        vflags = L.VIP_F_HASH_SRC_ONLY if spec.hash_src_only else 0
        if (first or cur.spec is None or cur.ring_id != old_ring_id
                or vflags != self._vflags(cur.spec)):
            self._after_rings.append(lambda k=L.vip_key(*spec.ident), v=cur.vip_id, f=vflags,
                                     m=cur.ring_size, r=cur.ring_id: dp.set_vip(k, v, f, m, r))
        gone = [bid for addr, bid in cur.bids.items() if addr not in new_bids]
        for b, bid, flags, nid in demote:
            gen = self._gen[bid] = (self._gen.get(bid, 0) + 1) & 0xFFFF
            later.append(lambda b=b, bid=bid, f=flags, n=nid, v=cur.vip_id, g=gen:
                         dp.set_backend(bid, b.address, v, n, f, g))
        for bid in gone:
            rep.backends_removed += 1
            cur.flags.pop(bid, None)
            later.append(lambda bid=bid, v=cur.vip_id: self._remove_backend(bid, v))
        cur.bids = new_bids
        cur.spec = spec

    def _flush_rings(self) -> None:
        """Swap pending rings in, then write the VIP entries that wait for them."""
        if self._rings:
            self.dp.install_rings(self._rings)
        after = self._after_rings
        self._rings, self._after_rings = [], []
        for fn in after:
            fn()

    @staticmethod
    def _vflags(spec: VipSpec) -> int:
        return L.VIP_F_HASH_SRC_ONLY if spec.hash_src_only else 0

    def _remove_backend(self, bid: int, vip_id: int) -> None:
        """A backend leaves a VIP that stays: its counts stay in the VIP's total."""
        self._release_backend(bid)
        self.dp.retire_backend_counters(bid, vip_id)

    def _release_backend(self, bid: int) -> None:
        self.dp.clear_backend(bid)
        self._gen[bid] = (self._gen.get(bid, 0) + 1) & 0xFFFF  # its reuse starts anew
        self._free_be.append(bid)

    def _release_ring(self, ring_id: int) -> None:
        self.dp.remove_ring(ring_id)
        self._free_ring.append(ring_id)

    def _release_vip(self, cur: _Vip) -> None:
        if cur.ring_id:
            self._release_ring(cur.ring_id)
        for bid in cur.bids.values():
            self._release_backend(bid)
        self._free_vip.append(cur.vip_id)

    def adopt(self) -> int:
        """Rebuild ids from the maps an earlier instance left pinned (the Datapath adopted
        them), so the next apply() changes only what differs. Returns VIPs adopted."""
        dp = self.dp
        by_id: dict[int, _Vip] = {}
        for k, v in dp.maps["vips"].items():
            key, meta = L.VipKey.unpack(k), L.VipMeta.unpack(v)
            ident = (L.words_addr(key.addr, key.family), socket.ntohs(key.port), key.proto)
            ring = dp.read_ring(meta.ring_id) if meta.ring_id else None
            cur = _Vip(meta.vip_id, None, ring if self.keep_rings else None,
                       _digest(ring) if ring is not None else None,
                       ring_id=meta.ring_id if ring is not None else 0,
                       ring_size=len(ring) if ring is not None else 0)
            self.vips[ident] = by_id[meta.vip_id] = cur
        used_be, used_nh = set(), set()
        for bid in range(1, dp.limits.max_backends):
            b = dp.backend(bid)
            if b.family == L.AF_NONE or b.vip_id not in by_id:
                continue
            cur = by_id[b.vip_id]
            cur.bids[L.words_addr(b.addr, b.family)] = bid
            cur.flags[bid] = (b.flags, b.nexthop_id)
            self._gen[bid] = b.gen
            used_be.add(bid)
            used_nh.add(b.nexthop_id)
        self._free_vip = collections.deque(i for i in self._free_vip if i not in by_id)
        rings = {v.ring_id for v in by_id.values()}
        self._free_ring = collections.deque(i for i in self._free_ring if i not in rings)
        self._free_be = collections.deque(i for i in self._free_be if i not in used_be)
        self._free_nh = collections.deque(i for i in self._free_nh if i not in used_nh)
        return len(by_id)

    # --- read-only views for stats, explain and tests ------------------------------
    def installed(self, ident: tuple) -> Optional[InstalledVip]:
        """What the maps hold for VIP `ident` (address, port, proto); None: not installed."""
        v = self.vips.get(ident)
        if v is None:
            return None
        stay = frozenset(a for a, bid in v.bids.items()
                         if v.flags.get(bid, (0, 0))[0] & L.BE_F_FLOWS_STAY)
        return InstalledVip(v.vip_id, v.ring_id, v.ring_size, MappingProxyType(dict(v.bids)),
                            stay)

    def ring(self, ident: tuple) -> Optional[array.array]:
        """The installed ring of VIP `ident` (the kept copy, or read from the map)."""
        v = self.vips.get(ident)
        if v is None or not v.ring_id:
            return None
        return v.ring if v.ring is not None else self.dp.read_ring(v.ring_id)
