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

`mapplan.diff` decides (takes ids, updates the records of lb/installed.py) and writes
nothing: it fills a `Plan` whose lists are these steps; `planwriter.PlanWriter` writes
them in that order.

An apply that raises leaves the records ahead of the maps: it forgets what it believes
written (the next apply rewrites every entry; map writes are idempotent) and keeps the
releases it did not get to for the next apply, so no id is lost.

A reload is all-or-nothing (lb/reload.py): `checkpoint()` before it, and when it fails,
`rollback()` returns the records (ids, generations, counters moved) to the checkpoint and
marks every entry for rewriting (rings only where the failed apply wrote or removed
one), so the next apply, of the old state, puts back what the failed one changed (the
MACs as the map held them) and clears what it added.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .datapath import Datapath, EgressConfig
from .installed import UNKNOWN, InstalledVip, Records, VipRecord, digest, next_gen
from .mapplan import ApplyReport, Plan, carry_over, diff
from .planwriter import Journal, PlanWriter
from .quicmaps import QuicMaps
from .specs import VipSpec

__all__ = ["ApplyReport", "Checkpoint", "InstalledVip", "Programmer", "VipSpec"]


@dataclass
class Checkpoint:
    """The programmer's records at one moment, and what was written since that the
    records cannot tell (see Programmer.checkpoint)."""

    records: Records
    unfinished: Plan
    journal: Journal


class Programmer:
    def __init__(self, dp: Datapath, keep_rings: bool = True):
        """keep_rings=False keeps only a digest per ring (1,000 rings of 65537 slots
        would hold 256 MB in Python); the installed ring stays readable from the map."""
        self.dp = dp
        self.quic = QuicMaps(dp)
        self.keep_rings = keep_rings
        self.rec = Records(dp.limits)
        self.writer = PlanWriter(dp, self.quic, self.rec)
        self._unfinished = Plan()  # releases an apply that raised did not get to

    @property
    def nexthops(self) -> Mapping[str, int]:
        """Next-hop key -> id."""
        return self.rec.nexthops

    # --- the one entry point -------------------------------------------------------
    def apply(self, vips: Sequence[VipSpec], macs: Mapping[str, bytes],
              egress: Optional[EgressConfig] = None) -> ApplyReport:
        """Make the maps hold `vips`, next-hop `macs` and (unless None) `egress`."""
        plan, rep = Plan(), ApplyReport()
        if self.writer.journal is not None:
            self.writer.journal.applied = True
        try:
            carry_over(plan, self._unfinished, {v.ident for v in vips})
            self._unfinished = Plan()
            if self.rec.quic_resync:
                self._read_quic(plan)
            diff(self.rec, plan, rep, vips, macs, egress, self.keep_rings)
            self.writer.execute(plan)
        except BaseException:
            self._forget(plan)
            raise
        return rep

    def _forget(self, plan: Plan) -> None:
        """After an apply raised partway: believe nothing written, so the next apply
        rewrites every entry, and hand it the releases this one did not do."""
        self.rec.quic_filter |= plan.quic_filter[0] | plan.quic_filter[1]
        self.rec.forget()
        self._unfinished = plan.leftovers()
        self._unfinished.addrs[2].update(ident[0] for ident in self.rec.vips)

    # --- all-or-nothing reloads ----------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        """The records now; what the writer does from here on is noted for rollback()."""
        self.writer.journal = Journal()
        return Checkpoint(self.rec.copy(), self._unfinished.copy(), self.writer.journal)

    def release(self, cp: Checkpoint) -> None:
        """The change since `cp` stays: stop noting."""
        if self.writer.journal is cp.journal:
            self.writer.journal = None

    def rollback(self, cp: Checkpoint) -> None:
        """Back to the records of `cp`, whatever the applies since wrote: ids, generations
        and the counts of removed backends as they were (counts move back at once); the
        next apply, of the state of `cp` (the caller's old config), rewrites every entry
        but the rings no apply since touched, clears the entries written under ids that
        are free again, and puts back each next-hop MAC written since as the map held it
        (the old config may lack a MAC the failed one resolved, or the id be new)."""
        self.release(cp)
        if not cp.journal.applied:  # nothing written: the records hold as they are
            return
        now, left = self.rec.in_use(), self._unfinished
        for v in left.vip_releases:  # popped, not released: they hold ids yet
            now["ring"].update([v.ring_id] if v.ring_id else [])
            now["backend"].update(v.bids.values())
        stale = set(left.addrs[2]) | {ident[0] for ident in self.rec.vips}
        quic_filter = set(self.rec.quic_filter)
        for bid, vip_id, moved in reversed(cp.journal.retired):
            self.dp.unretire_backend_counters(bid, vip_id, moved)
        self.rec.restore(cp.records)
        self._unfinished = cp.unfinished.copy()
        keep = self.rec.in_use()
        undo = self._unfinished
        undo.vip_deletes.extend(now["vip"] - keep["vip"])
        undo.strays.extend((kind, i) for kind in ("ring", "backend")
                           for i in sorted(now[kind] - keep[kind]))
        # before the restores pending at the checkpoint, which were to come after
        undo.mac_restores[:0] = sorted(cp.journal.macs.items())
        undo.addrs[2].update(stale)
        self.rec.quic_filter |= quic_filter
        written = {bid: e for v in self.rec.vips.values() for bid, e in v.written.items()}
        self.rec.forget(touched_rings=cp.journal.rings)
        for cur in self.rec.vips.values():
            for bid in cur.bids.values():
                old, stay = written.get(bid), cp.journal.flows_stay.get(bid)
                if stay is None and old is not None:  # not written since: as it was
                    cur.written[bid] = old
                elif stay and not (old and old[0]):
                    # it had flows-stay meanwhile: losing it takes a new generation
                    cur.written[bid] = UNKNOWN
                else:
                    cur.written.pop(bid)

    # --- adoption ------------------------------------------------------------------
    def adopt(self) -> int:
        """Rebuild ids from the maps an earlier instance left pinned (the Datapath adopted
        them), so the next apply() changes only what differs. Returns VIPs adopted."""
        dp, rec = self.dp, self.rec
        by_id: dict[int, VipRecord] = {}
        for ident, e in dp.vip_entries():
            ring = dp.read_ring(e.ring_id) if e.ring_id else None
            cur = VipRecord(e.vip_id, None, ring if self.keep_rings else None,
                            digest(ring) if ring is not None else None,
                            ring_id=e.ring_id if ring is not None else 0,
                            ring_size=len(ring) if ring is not None else 0)
            rec.vips[ident] = by_id[e.vip_id] = cur
        used_be, used_nh = set(), set()
        rec.gen.update(dp.released_generations())
        for bid, b in dp.backend_entries():
            if b.vip_id not in by_id:
                # left behind by a VIP that is gone (an instance killed mid-release):
                # released now, as it would have been
                rec.gen[bid] = next_gen(b.gen)
                dp.clear_backend(bid, rec.gen[bid])
                continue
            cur = by_id[b.vip_id]
            cur.bids[b.addr] = bid
            cur.written[bid] = (b.keep_flows, b.nexthop_id)
            rec.gen[bid] = b.gen
            used_be.add(bid)
            used_nh.add(b.nexthop_id)
        rec.drop_free(vip=set(by_id), ring={v.ring_id for v in by_id.values()},
                      backend=used_be, nexthop=used_nh)
        rec.quic_resync = True
        return len(by_id)

    def _read_quic(self, plan: Plan) -> None:
        """quic_servers read back (after adopt or a raise) into the VIPs' records; entries
        of no VIP are deleted, every entry's filter bits rewritten."""
        by_id = {v.vip_id: v for v in self.rec.vips.values()}
        for v in by_id.values():
            v.quic = {}
        for r, t in self.quic.entries():
            owner = by_id.get(t.vip_id)
            if owner is None:
                plan.quic_deletes.append(r)
            else:
                owner.quic[r] = t
            self.rec.quic_filter.add(r.filter_entry)
        self.rec.quic_resync = False

    # --- read-only views for stats, explain and tests ------------------------------
    def installed(self, ident: tuple) -> Optional[InstalledVip]:
        """What the maps hold for VIP `ident` (address, port, proto); None: not installed."""
        v = self.rec.vips.get(ident)
        return None if v is None else v.view()

    def ring(self, ident: tuple) -> Optional[array.array]:
        """The installed ring of VIP `ident` (the kept copy, or read from the map)."""
        v = self.rec.vips.get(ident)
        if v is None or not v.ring_id:
            return None
        return v.ring if v.ring is not None else self.dp.read_ring(v.ring_id)
