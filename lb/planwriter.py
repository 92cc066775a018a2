"""Writing one apply's `Plan` (lb/mapplan.py) into the maps, in the order that never
lets a packet see a half-built state (see lb/programmer.py), and freeing the ids of what
it released."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional

from .datapath import Datapath
from .installed import Records, VipRecord, next_gen
from .mapplan import BackendWrite, Plan, VipWrite
from .quicmaps import QuicMaps

RING_BATCH = 64  # rings held before a batched swap (memory vs. RCU waits)


def _each(items: list, write) -> None:
    """write(item) for each item, dropping it once done: what an apply that raised
    leaves in a list is exactly what it did not do."""
    while items:
        write(items[0])
        del items[0]


@dataclass
class Journal:
    """What the writer did since a checkpoint that a rollback cannot tell from the
    records: counts moved, which backend entries were written with what, which ring
    slots and next-hop MACs were written."""

    applied: bool = False  # an apply ran since (else the maps are as they were)
    retired: list = field(default_factory=list)  # (backend id, VIP id, per-CPU counts)
    flows_stay: dict = field(default_factory=dict)  # backend id -> written with the flag
    rings: set = field(default_factory=set)  # ring ids swapped or removed (or about to be)
    # next-hop id -> the MAC it held before its first write since; read from the map, as
    # the records do not know what an unresolved next hop's entry holds
    macs: dict = field(default_factory=dict)


class PlanWriter:
    """Writes plans for records `rec` into the maps of `dp`, noting in `journal` (when
    set) what a rollback needs."""

    def __init__(self, dp: Datapath, quic: QuicMaps, rec: Records):
        self.dp, self.quic, self.rec = dp, quic, rec
        self.journal: Optional[Journal] = None

    def execute(self, plan: Plan) -> None:
        dp, quic = self.dp, self.quic
        if plan.tx_port is not None:
            dp.set_tx_port(plan.tx_port)
        if plan.config is not None:
            dp.set_config(plan.config)
        _each(plan.counter_resets, lambda r: dp.reset_counters(*r))
        for nid, mac in plan.nexthops:
            self._set_nexthop((nid, mac))
        for w in plan.gains:
            self._write_backend(w)
        # each batch of rings, then the VIP entries that wait for no later ring
        entries = collections.deque(plan.vip_entries)
        for start in range(0, len(plan.rings), RING_BATCH):
            batch = plan.rings[start:start + RING_BATCH]
            self._note_rings(ring_id for ring_id, _ in batch)
            dp.install_rings(batch)
            while entries and entries[0][0] <= start + RING_BATCH:
                self._write_vip(entries.popleft()[1])
        for _, v in entries:
            self._write_vip(v)
        _each(plan.vip_deletes, lambda ident: dp.delete_vip(*ident))
        now, before, stale = plan.addrs
        if stale:  # after an apply that raised: every address again, then the leftovers
            dp.set_vip_addrs(now)
        dp.set_vip_addrs(now, before | stale)
        quic.apply(plan.quic_sets, lambda rt: quic.set_server(*rt))
        qnow, qbefore = plan.quic_filter
        quic.set_filter(qnow | qbefore)
        for w in plan.demotions:
            self._write_backend(w)
        quic.apply(plan.quic_deletes, quic.delete_server)
        quic.set_filter(qnow, qbefore)
        _each(plan.ring_releases, self._release_ring)
        _each(plan.backend_removals, self._remove_backend)
        _each(plan.vip_releases, self._release_vip)
        _each(plan.strays, self._clear_stray)
        _each(plan.mac_restores, self._set_nexthop)

    def _set_nexthop(self, write: tuple[int, bytes]) -> None:
        nid, mac = write
        if self.journal is not None and nid not in self.journal.macs:
            self.journal.macs[nid] = self.dp.nexthop_mac(nid)
        self.dp.set_nexthop(nid, mac)

    def _note_rings(self, ring_ids) -> None:
        # noted before the write: a write that fails partway may have swapped some in
        if self.journal is not None:
            self.journal.rings.update(ring_ids)

    def _write_backend(self, w: BackendWrite) -> None:
        self._note(w.bid, w.keep_flows)
        self.dp.set_backend(w.bid, w.addr, w.vip_id, w.nexthop_id, w.keep_flows, w.gen)

    def _note(self, bid: int, flows_stay: bool) -> None:
        if self.journal is not None:
            stay = self.journal.flows_stay
            stay[bid] = stay.get(bid, False) or flows_stay

    def _write_vip(self, v: VipWrite) -> None:
        self.dp.set_vip(*v.ident, vip_id=v.vip_id, ring_id=v.ring_id, ring_size=v.ring_size,
                        hash_src_only=v.hash_src_only, quic=v.quic)

    def _remove_backend(self, removal: tuple[int, int]) -> None:
        """A backend leaves a VIP that stays: its counts stay in the VIP's total."""
        bid, vip_id = removal
        self._clear_backend(bid)
        moved = self.dp.retire_backend_counters(bid, vip_id)
        if self.journal is not None:
            self.journal.retired.append((bid, vip_id, moved))
        self.rec.free_be.append(bid)

    def _clear_backend(self, bid: int) -> None:
        # its reuse starts anew; the released entry keeps the generation for adopt()
        gen = self.rec.gen[bid] = next_gen(self.rec.gen.get(bid, 0))
        self._note(bid, False)
        self.dp.clear_backend(bid, gen)

    def _release_vip(self, cur: VipRecord) -> None:
        """Each part's id is freed once its entry is gone (a raise leaves the rest)."""
        if cur.ring_id:
            self._release_ring(cur.ring_id)
            cur.ring_id = 0
        for addr, bid in list(cur.bids.items()):
            self._clear_backend(bid)
            self.rec.free_be.append(bid)
            del cur.bids[addr]
        self.rec.free_vip.append(cur.vip_id)

    def _release_ring(self, ring_id: int) -> None:
        self._note_rings((ring_id,))
        self.dp.remove_ring(ring_id)
        self.rec.free_ring.append(ring_id)

    def _clear_stray(self, stray: tuple[str, int]) -> None:
        """An entry a rejected reload wrote under an id that is free again: back to what
        a free id holds (no ring; a released backend keeping its generation)."""
        kind, ident = stray
        if kind == "ring":
            self._note_rings((ident,))
            self.dp.remove_ring(ident)
        else:
            self.dp.clear_backend(ident, self.rec.gen.get(ident, 0))
