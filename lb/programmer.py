"""Turn a desired state (VIPs, backends, next hops, egress) into map contents, changing only
what differs, in an order that never lets a packet see a half-built state:

0. egress settings: the redirect port, then the config (never a redirect to an empty slot);
1. next-hop MACs, then backend entries that gain something (new, or may now keep flows);
2. each changed ring, filled completely in a new inner map and swapped in atomically
   (all of one apply in batches: the kernel waits an RCU grace period per update call);
3. VIP entries, then VIP addresses (vip_addrs, then the prefilter bit that makes them live),
   QUIC server IDs (quic_servers, then the filter bits that make them live);
4. only then what loses something: backend flags removed, QUIC server IDs and filter bits
   dropped, backends and VIPs released.

`_diff` decides (takes ids, updates the records) and writes nothing: it fills a `_Plan`
whose lists are these steps; `_execute` writes them in that order.

An apply that raises leaves the records ahead of the maps: it forgets what it believes
written (the next apply rewrites every entry; map writes are idempotent) and keeps the
releases it did not get to for the next apply, so no id is lost.

Ids: a VIP gets an id (ring slot and counters), each VIP/backend pair a backend id. Freed
ids go to the back of a FIFO, so an id is reused as late as possible; the data path also
refuses a flow-table entry whose backend belongs to another VIP.
"""

from __future__ import annotations

import array
import collections
import hashlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, NamedTuple, Optional, Sequence

from .datapath import Datapath, EgressConfig
from .layout import IPAddress
from .quicmaps import QuicMaps, routes_of
from .specs import VipSpec, ring_for

RING_BATCH = 64  # rings held before a batched swap (memory vs. RCU waits)


@dataclass(frozen=True)
class InstalledVip:
    """What the maps hold for one VIP (a read-only view for stats, explain and tests)."""

    vip_id: int
    ring_id: int
    ring_size: int
    backends: Mapping[IPAddress, int]  # address -> backend id
    flows_stay: frozenset  # backends written with the flows-stay flag


@dataclass
class _VipRecord:
    """The programmer's record of one installed VIP."""

    vip_id: int
    spec: Optional[VipSpec]  # None: adopted from pinned maps, not yet reconciled
    ring: Optional[array.array] = None  # kept only with Programmer(keep_rings=True)
    digest: Optional[bytes] = None      # of the installed ring
    bids: dict = field(default_factory=dict)  # backend address -> backend id
    written: dict = field(default_factory=dict)  # backend id -> (keep_flows, nexthop id)
    ring_id: int = 0                    # slot in `rings` of the installed ring
    ring_size: int = 0
    quic: dict = field(default_factory=dict)  # QuicRoute -> QuicTarget written


class _BackendWrite(NamedTuple):
    bid: int
    addr: IPAddress
    vip_id: int
    nexthop_id: int
    keep_flows: bool
    gen: int


class _VipWrite(NamedTuple):
    ident: tuple
    vip_id: int
    ring_id: int
    ring_size: int
    hash_src_only: bool
    quic: bool


@dataclass
class _Plan:
    """One apply's map writes; _execute runs the lists in this order (see above)."""

    tx_port: Optional[int] = None           # 0. None: unchanged
    config: Optional[EgressConfig] = None   # 0. None: unchanged
    counter_resets: list = field(default_factory=list)  # 1. (kind, id) of ids taken now
    nexthops: list = field(default_factory=list)        # 1. (next-hop id, MAC)
    gains: list = field(default_factory=list)           # 1. _BackendWrite
    rings: list = field(default_factory=list)           # 2. (ring id, ring)
    # 3. (rings that must be in first, _VipWrite), in that order
    vip_entries: list = field(default_factory=list)
    vip_deletes: list = field(default_factory=list)     # 3. idents
    # 3. (VIP addresses, previous, addresses an apply that raised may have left)
    addrs: tuple = field(default_factory=lambda: (set(), set(), set()))
    quic_sets: list = field(default_factory=list)       # 3. (QuicRoute, QuicTarget)
    quic_filter: tuple = field(default_factory=lambda: (set(), set()))  # 3./4. now, before
    quic_deletes: list = field(default_factory=list)    # 4. QuicRoute
    demotions: list = field(default_factory=list)       # 4. _BackendWrite, new generation
    ring_releases: list = field(default_factory=list)   # 4. ring ids
    backend_removals: list = field(default_factory=list)  # 4. (backend id, its VIP's id)
    vip_releases: list = field(default_factory=list)    # 4. _VipRecord


@dataclass
class ApplyReport:
    vips_added: int = 0
    vips_removed: int = 0
    vips_changed: int = 0
    backends_added: int = 0
    backends_removed: int = 0
    rings_swapped: int = 0


def _digest(ring: array.array) -> bytes:
    return hashlib.blake2b(ring.tobytes(), digest_size=16).digest()


def _next_gen(gen: int) -> int:
    return (gen + 1) & 0xFFFF


# what `written` holds for a backend entry after an apply raised: unknown, and possibly with
# flows-stay, so a backend that must not keep flows loses them the safe way (a demotion)
_UNKNOWN = (True, None)


def _each(items: list, write) -> None:
    """write(item) for each item, dropping it once done: what an apply that raised
    leaves in a list is exactly what it did not do."""
    while items:
        write(items[0])
        del items[0]


class Programmer:
    def __init__(self, dp: Datapath, keep_rings: bool = True):
        """keep_rings=False keeps only a digest per ring (1,000 rings of 65537 slots
        would hold 256 MB in Python); the installed ring stays readable from the map."""
        self.dp = dp
        self.quic = QuicMaps(dp)
        self.keep_rings = keep_rings
        self._vips: dict[tuple, _VipRecord] = {}
        self._free_vip = collections.deque(range(1, dp.limits.max_vips))
        self._free_ring = collections.deque(range(1, 2 * dp.limits.max_vips))
        self._free_be = collections.deque(range(1, dp.limits.max_backends))
        self._free_nh = collections.deque(range(1, dp.limits.max_nexthops))
        self.nexthops: dict[str, int] = {}
        self._gen: dict[int, int] = {}  # backend id -> generation (see struct backend)
        self._macs: dict[int, bytes] = {}
        self._egress: Optional[EgressConfig] = None
        self._unfinished = _Plan()  # releases an apply that raised did not get to
        self._quic_filter: set = set()  # filter entries written
        self._quic_resync = False  # quic_servers to be read back (after adopt or a raise)

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
        plan, rep = _Plan(), ApplyReport()
        try:
            self._diff(plan, rep, vips, macs, egress)
            self._execute(plan)
        except BaseException:
            self._forget(plan)
            raise
        return rep

    def _forget(self, plan: _Plan) -> None:
        """After an apply raised partway: believe nothing written, so the next apply
        rewrites every entry, and hand it the releases this one did not do."""
        self._macs.clear()
        self._egress = None
        self._quic_resync = True
        self._quic_filter |= plan.quic_filter[0] | plan.quic_filter[1]
        for cur in self._vips.values():
            cur.spec = cur.digest = None
            cur.written = dict.fromkeys(cur.bids.values(), _UNKNOWN)
        now, before, stale = plan.addrs
        left = self._unfinished = _Plan(
            counter_resets=plan.counter_resets, vip_deletes=plan.vip_deletes,
            ring_releases=plan.ring_releases, backend_removals=plan.backend_removals,
            vip_releases=plan.vip_releases)
        left.addrs[2].update(now | before | stale | {ident[0] for ident in self._vips})

    def _diff(self, plan: _Plan, rep: ApplyReport, vips: Sequence[VipSpec],
              macs: Mapping[str, bytes], egress: Optional[EgressConfig]) -> None:
        wanted = {v.ident: v for v in vips}
        left, self._unfinished = self._unfinished, _Plan()
        plan.counter_resets.extend(left.counter_resets)
        plan.vip_deletes.extend(i for i in left.vip_deletes if i not in wanted)
        plan.ring_releases.extend(left.ring_releases)
        plan.backend_removals.extend(left.backend_removals)
        plan.vip_releases.extend(left.vip_releases)
        plan.addrs[2].update(left.addrs[2])
        if self._quic_resync:
            self._read_quic(plan)
        if egress is not None:
            if egress.tx_port is not None and (self._egress is None
                                               or egress.tx_port != self._egress.tx_port):
                plan.tx_port = egress.tx_port
            if egress != self._egress:
                plan.config = self._egress = egress
        # every next hop gets its id now, resolved or not, so backend entries point at
        # it from the start and a MAC learnt later needs only the nexthops write
        for v in vips:
            for b in v.backends:
                self._nexthop_id(b.nexthop)
        for key, mac in macs.items():
            nid = self._nexthop_id(key)
            if self._macs.get(nid) != mac:
                plan.nexthops.append((nid, mac))
                self._macs[nid] = mac

        old_addrs = {ident[0] for ident in self._vips}
        for ident, spec in wanted.items():
            cur = self._vips.get(ident)
            if cur is None:
                vid = self._take(self._free_vip, "VIP")
                plan.counter_resets.append(("vip", vid))
                cur = self._vips[ident] = _VipRecord(vid, None)
                rep.vips_added += 1
            elif cur.spec == spec:
                continue
            else:
                rep.vips_changed += 1
            self._diff_vip(cur, spec, plan, rep)
        for ident in [i for i in self._vips if i not in wanted]:
            plan.vip_deletes.append(ident)
            plan.quic_deletes.extend(self._vips[ident].quic)
            plan.vip_releases.append(self._vips.pop(ident))
            rep.vips_removed += 1
        plan.addrs[0].update(v.spec.address for v in self._vips.values())
        plan.addrs[1].update(old_addrs)
        now = {r.filter_entry for v in self._vips.values() for r in v.quic}
        plan.quic_filter[0].update(now)
        plan.quic_filter[1].update(self._quic_filter)
        self._quic_filter = now

    def _diff_vip(self, cur: _VipRecord, spec: VipSpec, plan: _Plan,
                  rep: ApplyReport) -> None:
        first = cur.digest is None
        new_bids: dict = {}
        for b in spec.backends:
            bid = cur.bids.get(b.address)
            if bid is None:
                bid = cur.bids[b.address] = self._take(self._free_be, "backend")
                plan.counter_resets.append(("backend", bid))
                rep.backends_added += 1
            new_bids[b.address] = bid
            entry = (b.keep_flows, self.nexthops.get(b.nexthop, 0))
            old = cur.written.get(bid)
            if old == entry:
                continue
            if old is not None and old[0] and not b.keep_flows:
                # loses FLOWS_STAY: after the swap, and in a new generation, so no stale
                # copy of one of its flow entries (another CPU's cache) is honoured again
                gen = self._gen[bid] = _next_gen(self._gen.get(bid, 0))
                plan.demotions.append(_BackendWrite(bid, b.address, cur.vip_id, entry[1],
                                                    False, gen))
            else:
                plan.gains.append(_BackendWrite(bid, b.address, cur.vip_id, entry[1],
                                                b.keep_flows, self._gen.get(bid, 0)))
            cur.written[bid] = entry
        ring = ring_for(spec, new_bids)
        digest = _digest(ring)
        old_ring_id = cur.ring_id
        if digest != cur.digest:
            if not cur.ring_id or len(ring) != cur.ring_size:
                # a new size goes to a new slot; the VIP entry switches id and size at once
                cur.ring_id, cur.ring_size = self._take(self._free_ring, "ring"), len(ring)
                if old_ring_id:
                    plan.ring_releases.append(old_ring_id)
            plan.rings.append((cur.ring_id, ring))
            cur.digest = digest
            cur.ring = ring if self.keep_rings else None
            rep.rings_swapped += 1
        if (first or cur.spec is None or cur.ring_id != old_ring_id
                or spec.hash_src_only != cur.spec.hash_src_only
                or (spec.quic is None) != (cur.spec.quic is None)):
            plan.vip_entries.append((len(plan.rings), _VipWrite(
                spec.ident, cur.vip_id, cur.ring_id, cur.ring_size, spec.hash_src_only,
                spec.quic is not None)))
        quic = routes_of(spec, new_bids, cur.vip_id)
        plan.quic_sets.extend((r, t) for r, t in quic.items() if cur.quic.get(r) != t)
        plan.quic_deletes.extend(r for r in cur.quic if r not in quic)
        cur.quic = quic
        for addr, bid in cur.bids.items():  # new ones are in already: a raise leaks none
            if addr not in new_bids:
                rep.backends_removed += 1
                cur.written.pop(bid, None)
                plan.backend_removals.append((bid, cur.vip_id))
        cur.bids = new_bids
        cur.spec = spec

    def _execute(self, plan: _Plan) -> None:
        dp = self.dp
        if plan.tx_port is not None:
            dp.set_tx_port(plan.tx_port)
        if plan.config is not None:
            dp.set_config(plan.config)
        _each(plan.counter_resets, lambda r: dp.reset_counters(*r))
        for nid, mac in plan.nexthops:
            dp.set_nexthop(nid, mac)
        for w in plan.gains:
            dp.set_backend(w.bid, w.addr, w.vip_id, w.nexthop_id, w.keep_flows, w.gen)
        # each batch of rings, then the VIP entries that wait for no later ring
        entries = collections.deque(plan.vip_entries)
        for start in range(0, len(plan.rings), RING_BATCH):
            dp.install_rings(plan.rings[start:start + RING_BATCH])
            while entries and entries[0][0] <= start + RING_BATCH:
                self._write_vip(entries.popleft()[1])
        for _, v in entries:
            self._write_vip(v)
        _each(plan.vip_deletes, lambda ident: dp.delete_vip(*ident))
        now, before, stale = plan.addrs
        if stale:  # after an apply that raised: every address again, then the leftovers
            dp.set_vip_addrs(now)
        dp.set_vip_addrs(now, before | stale)
        self.quic.apply(plan.quic_sets, lambda rt: self.quic.set_server(*rt))
        qnow, qbefore = plan.quic_filter
        self.quic.set_filter(qnow | qbefore)
        for w in plan.demotions:
            dp.set_backend(w.bid, w.addr, w.vip_id, w.nexthop_id, w.keep_flows, w.gen)
        self.quic.apply(plan.quic_deletes, self.quic.delete_server)
        self.quic.set_filter(qnow, qbefore)
        _each(plan.ring_releases, self._release_ring)
        _each(plan.backend_removals, self._remove_backend)
        _each(plan.vip_releases, self._release_vip)

    def _write_vip(self, v: _VipWrite) -> None:
        self.dp.set_vip(*v.ident, vip_id=v.vip_id, ring_id=v.ring_id, ring_size=v.ring_size,
                        hash_src_only=v.hash_src_only, quic=v.quic)

    def _remove_backend(self, removal: tuple[int, int]) -> None:
        """A backend leaves a VIP that stays: its counts stay in the VIP's total."""
        bid, vip_id = removal
        self._clear_backend(bid)
        self.dp.retire_backend_counters(bid, vip_id)
        self._free_backend(bid)

    def _release_backend(self, bid: int) -> None:
        self._clear_backend(bid)
        self._free_backend(bid)

    def _clear_backend(self, bid: int) -> None:
        # its reuse starts anew; the released entry keeps the generation for adopt()
        self._gen[bid] = _next_gen(self._gen.get(bid, 0))
        self.dp.clear_backend(bid, self._gen[bid])

    def _free_backend(self, bid: int) -> None:
        self._free_be.append(bid)

    def _release_vip(self, cur: _VipRecord) -> None:
        """Each part's id is freed once its entry is gone (a raise leaves the rest)."""
        if cur.ring_id:
            self._release_ring(cur.ring_id)
            cur.ring_id = 0
        for addr, bid in list(cur.bids.items()):
            self._release_backend(bid)
            del cur.bids[addr]
        self._free_vip.append(cur.vip_id)

    def _release_ring(self, ring_id: int) -> None:
        self.dp.remove_ring(ring_id)
        self._free_ring.append(ring_id)

    def adopt(self) -> int:
        """Rebuild ids from the maps an earlier instance left pinned (the Datapath adopted
        them), so the next apply() changes only what differs. Returns VIPs adopted."""
        dp = self.dp
        by_id: dict[int, _VipRecord] = {}
        for ident, e in dp.vip_entries():
            ring = dp.read_ring(e.ring_id) if e.ring_id else None
            cur = _VipRecord(e.vip_id, None, ring if self.keep_rings else None,
                                _digest(ring) if ring is not None else None,
                                ring_id=e.ring_id if ring is not None else 0,
                                ring_size=len(ring) if ring is not None else 0)
            self._vips[ident] = by_id[e.vip_id] = cur
        used_be, used_nh = set(), set()
        self._gen.update(dp.released_generations())
        for bid, b in dp.backend_entries():
            if b.vip_id not in by_id:
                # left behind by a VIP that is gone (an instance killed mid-release):
                # released now, as it would have been
                self._gen[bid] = _next_gen(b.gen)
                dp.clear_backend(bid, self._gen[bid])
                continue
            cur = by_id[b.vip_id]
            cur.bids[b.addr] = bid
            cur.written[bid] = (b.keep_flows, b.nexthop_id)
            self._gen[bid] = b.gen
            used_be.add(bid)
            used_nh.add(b.nexthop_id)
        self._free_vip = collections.deque(i for i in self._free_vip if i not in by_id)
        rings = {v.ring_id for v in by_id.values()}
        self._free_ring = collections.deque(i for i in self._free_ring if i not in rings)
        self._free_be = collections.deque(i for i in self._free_be if i not in used_be)
        self._free_nh = collections.deque(i for i in self._free_nh if i not in used_nh)
        self._quic_resync = True
        return len(by_id)

    def _read_quic(self, plan: _Plan) -> None:
        """quic_servers read back (after adopt or a raise) into the VIPs' records; entries
        of no VIP are deleted, every entry's filter bits rewritten."""
        by_id = {v.vip_id: v for v in self._vips.values()}
        for v in by_id.values():
            v.quic = {}
        for r, t in self.quic.entries():
            owner = by_id.get(t.vip_id)
            if owner is None:
                plan.quic_deletes.append(r)
            else:
                owner.quic[r] = t
            self._quic_filter.add(r.filter_entry)
        self._quic_resync = False

    # --- read-only views for stats, explain and tests ------------------------------
    def installed(self, ident: tuple) -> Optional[InstalledVip]:
        """What the maps hold for VIP `ident` (address, port, proto); None: not installed."""
        v = self._vips.get(ident)
        if v is None:
            return None
        stay = frozenset(a for a, bid in v.bids.items() if v.written.get(bid, (False,))[0])
        return InstalledVip(v.vip_id, v.ring_id, v.ring_size, MappingProxyType(dict(v.bids)),
                            stay)

    def ring(self, ident: tuple) -> Optional[array.array]:
        """The installed ring of VIP `ident` (the kept copy, or read from the map)."""
        v = self._vips.get(ident)
        if v is None or not v.ring_id:
            return None
        return v.ring if v.ring is not None else self.dp.read_ring(v.ring_id)
