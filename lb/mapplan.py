"""Deciding one apply: the desired state (VIP specs, next-hop MACs, egress) against the
records (lb/installed.py) gives a `Plan`, the map writes in the order lb/planwriter.py
runs them (see lb/programmer.py). Deciding takes ids and updates the records; it writes
nothing."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Mapping, NamedTuple, Optional, Sequence

from .datapath import EgressConfig
from .installed import Records, VipRecord, digest, next_gen
from .layout import IPAddress
from .quicmaps import routes_of
from .specs import VipSpec, ring_for


class BackendWrite(NamedTuple):
    bid: int
    addr: IPAddress
    vip_id: int
    nexthop_id: int
    keep_flows: bool
    gen: int


class VipWrite(NamedTuple):
    ident: tuple
    vip_id: int
    ring_id: int
    ring_size: int
    hash_src_only: bool
    quic: bool


@dataclass
class Plan:
    """One apply's map writes; the writer runs the lists in this order (see
    lb/programmer.py). What an apply that raised leaves in a list is what it did not do."""

    tx_port: Optional[int] = None           # 0. None: unchanged
    config: Optional[EgressConfig] = None   # 0. None: unchanged
    counter_resets: list = field(default_factory=list)  # 1. (kind, id) of ids taken now
    nexthops: list = field(default_factory=list)        # 1. (next-hop id, MAC)
    gains: list = field(default_factory=list)           # 1. BackendWrite
    rings: list = field(default_factory=list)           # 2. (ring id, ring)
    # 3. (rings that must be in first, VipWrite), in that order
    vip_entries: list = field(default_factory=list)
    vip_deletes: list = field(default_factory=list)     # 3. idents
    # 3. (VIP addresses, previous, addresses an apply that raised may have left)
    addrs: tuple = field(default_factory=lambda: (set(), set(), set()))
    quic_sets: list = field(default_factory=list)       # 3. (QuicRoute, QuicTarget)
    quic_filter: tuple = field(default_factory=lambda: (set(), set()))  # 3./4. now, before
    quic_deletes: list = field(default_factory=list)    # 4. QuicRoute
    demotions: list = field(default_factory=list)       # 4. BackendWrite, new generation
    ring_releases: list = field(default_factory=list)   # 4. ring ids
    backend_removals: list = field(default_factory=list)  # 4. (backend id, its VIP's id)
    vip_releases: list = field(default_factory=list)    # 4. VipRecord
    # 4. ("ring" | "backend", id): entries a rejected reload wrote under ids that are
    # free again; cleared, not freed
    strays: list = field(default_factory=list)
    # 4. (next-hop id, MAC): what a rejected reload's MAC writes replaced, put back
    # (last: until then backends of its half-written state may point at them)
    mac_restores: list = field(default_factory=list)

    def copy(self) -> "Plan":
        def copied(value):
            if isinstance(value, list):
                return [x.copy() if isinstance(x, VipRecord) else x for x in value]
            if isinstance(value, tuple):
                return tuple(set(s) for s in value)
            return value
        return Plan(**{f.name: copied(getattr(self, f.name)) for f in fields(self)})

    def leftovers(self) -> "Plan":
        """What an apply that raised hands the next one: the releases (and strays) it
        did not get to, and every address it may have touched."""
        now, before, stale = self.addrs
        left = Plan(counter_resets=self.counter_resets, vip_deletes=self.vip_deletes,
                    ring_releases=self.ring_releases, backend_removals=self.backend_removals,
                    vip_releases=self.vip_releases, strays=self.strays,
                    mac_restores=self.mac_restores)
        left.addrs[2].update(now | before | stale)
        return left


@dataclass
class ApplyReport:
    vips_added: int = 0
    vips_removed: int = 0
    vips_changed: int = 0
    backends_added: int = 0
    backends_removed: int = 0
    rings_swapped: int = 0


def carry_over(plan: Plan, left: Plan, wanted: Mapping) -> None:
    """What an apply that raised left undone goes into this one."""
    plan.counter_resets.extend(left.counter_resets)
    plan.vip_deletes.extend(i for i in left.vip_deletes if i not in wanted)
    plan.ring_releases.extend(left.ring_releases)
    plan.backend_removals.extend(left.backend_removals)
    plan.vip_releases.extend(left.vip_releases)
    plan.strays.extend(left.strays)
    plan.mac_restores.extend(left.mac_restores)
    plan.addrs[2].update(left.addrs[2])


def diff(rec: Records, plan: Plan, rep: ApplyReport, vips: Sequence[VipSpec],
         macs: Mapping[str, bytes], egress: Optional[EgressConfig],
         keep_rings: bool) -> None:
    """Fill `plan` with what makes the maps hold `vips`, `macs` and (unless None)
    `egress`, updating `rec` to what they will hold."""
    wanted = {v.ident: v for v in vips}
    if egress is not None:
        if egress.tx_port is not None and (rec.egress is None
                                           or egress.tx_port != rec.egress.tx_port):
            plan.tx_port = egress.tx_port
        if egress != rec.egress:
            plan.config = rec.egress = egress
    # every next hop gets its id now, resolved or not, so backend entries point at
    # it from the start and a MAC learnt later needs only the nexthops write
    for v in vips:
        for b in v.backends:
            if b.nexthop not in rec.nexthops and b.nexthop not in macs:
                # a new id may hold the MAC of an earlier instance's next hop (adopted
                # maps): none until this one resolves
                plan.nexthops.append((rec.nexthop_id(b.nexthop), bytes(6)))
            rec.nexthop_id(b.nexthop)
    for key, mac in macs.items():
        nid = rec.nexthop_id(key)
        if rec.macs.get(nid) != mac:
            plan.nexthops.append((nid, mac))
            rec.macs[nid] = mac
    # a MAC written now is the one wanted: no older one is put back over it
    written = {nid for nid, _ in plan.nexthops}
    plan.mac_restores[:] = [r for r in plan.mac_restores if r[0] not in written]

    old_addrs = {ident[0] for ident in rec.vips}
    for ident, spec in wanted.items():
        cur = rec.vips.get(ident)
        if cur is None:
            vid = rec.take(rec.free_vip, "VIP")
            plan.counter_resets.append(("vip", vid))
            cur = rec.vips[ident] = VipRecord(vid, None)
            rep.vips_added += 1
        elif cur.spec == spec:
            continue
        else:
            rep.vips_changed += 1
        _diff_vip(rec, cur, spec, plan, rep, keep_rings)
    for ident in [i for i in rec.vips if i not in wanted]:
        plan.vip_deletes.append(ident)
        plan.quic_deletes.extend(rec.vips[ident].quic)
        plan.vip_releases.append(rec.vips.pop(ident))
        rep.vips_removed += 1
    plan.addrs[0].update(v.spec.address for v in rec.vips.values())
    plan.addrs[1].update(old_addrs)
    now = {r.filter_entry for v in rec.vips.values() for r in v.quic}
    plan.quic_filter[0].update(now)
    plan.quic_filter[1].update(rec.quic_filter)
    rec.quic_filter = now


def _diff_vip(rec: Records, cur: VipRecord, spec: VipSpec, plan: Plan, rep: ApplyReport,
              keep_rings: bool) -> None:
    first = cur.digest is None
    new_bids: dict = {}
    for b in spec.backends:
        bid = cur.bids.get(b.address)
        if bid is None:
            bid = cur.bids[b.address] = rec.take(rec.free_be, "backend")
            plan.counter_resets.append(("backend", bid))
            rep.backends_added += 1
        new_bids[b.address] = bid
        entry = (b.keep_flows, rec.nexthops.get(b.nexthop, 0))
        old = cur.written.get(bid)
        if old == entry:
            continue
        if old is not None and old[0] and not b.keep_flows:
            # loses FLOWS_STAY: after the swap, and in a new generation, so no stale
            # copy of one of its flow entries (another CPU's cache) is honoured again
            gen = rec.gen[bid] = next_gen(rec.gen.get(bid, 0))
            plan.demotions.append(BackendWrite(bid, b.address, cur.vip_id, entry[1],
                                               False, gen))
        else:
            plan.gains.append(BackendWrite(bid, b.address, cur.vip_id, entry[1],
                                           b.keep_flows, rec.gen.get(bid, 0)))
        cur.written[bid] = entry
    ring = ring_for(spec, new_bids)
    ring_digest = digest(ring)
    old_ring_id = cur.ring_id
    if ring_digest != cur.digest:
        if not cur.ring_id or len(ring) != cur.ring_size:
            # a new size goes to a new slot; the VIP entry switches id and size at once
            cur.ring_id, cur.ring_size = rec.take(rec.free_ring, "ring"), len(ring)
            if old_ring_id:
                plan.ring_releases.append(old_ring_id)
        plan.rings.append((cur.ring_id, ring))
        cur.digest = ring_digest
        cur.ring = ring if keep_rings else None
        rep.rings_swapped += 1
    if (first or cur.spec is None or cur.ring_id != old_ring_id
            or spec.hash_src_only != cur.spec.hash_src_only
            or (spec.quic is None) != (cur.spec.quic is None)):
        plan.vip_entries.append((len(plan.rings), VipWrite(
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
