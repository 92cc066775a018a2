"""The programmer's records of what the maps hold, and the ids it hands out.

A VIP gets an id (ring slot and counters), each VIP/backend pair a backend id, each next
hop an id. Freed ids go to the back of a FIFO, so an id is reused as late as possible;
the data path also refuses a flow-table entry whose backend belongs to another VIP.

`Records.copy()` is a checkpoint: a rejected reload puts it back (lb/programmer.py).
"""

from __future__ import annotations

import array
import collections
import hashlib
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping, Optional

from .datapath import EgressConfig, Limits
from .errors import XdplbError
from .layout import IPAddress
from .specs import VipSpec


@dataclass(frozen=True)
class InstalledVip:
    """What the maps hold for one VIP (a read-only view for stats, explain and tests)."""

    vip_id: int
    ring_id: int
    ring_size: int
    backends: Mapping[IPAddress, int]  # address -> backend id
    flows_stay: frozenset  # backends written with the flows-stay flag


# what `written` holds for a backend entry after an apply raised: unknown, and possibly with
# flows-stay, so a backend that must not keep flows loses them the safe way (a demotion)
UNKNOWN = (True, None)


@dataclass
class VipRecord:
    """The programmer's record of one installed VIP."""

    vip_id: int
    spec: Optional[VipSpec]  # None: adopted from pinned maps, or unknown after a raise
    ring: Optional[array.array] = None  # kept only with Programmer(keep_rings=True)
    digest: Optional[bytes] = None      # of the installed ring
    bids: dict = field(default_factory=dict)  # backend address -> backend id
    written: dict = field(default_factory=dict)  # backend id -> (keep_flows, nexthop id)
    ring_id: int = 0                    # slot in `rings` of the installed ring
    ring_size: int = 0
    quic: dict = field(default_factory=dict)  # QuicRoute -> QuicTarget written

    def copy(self) -> "VipRecord":
        return replace(self, bids=dict(self.bids), written=dict(self.written),
                       quic=dict(self.quic))

    def view(self) -> InstalledVip:
        stay = frozenset(a for a, bid in self.bids.items()
                         if self.written.get(bid, (False,))[0])
        return InstalledVip(self.vip_id, self.ring_id, self.ring_size,
                            MappingProxyType(dict(self.bids)), stay)


def digest(ring: array.array) -> bytes:
    return hashlib.blake2b(ring.tobytes(), digest_size=16).digest()


def next_gen(gen: int) -> int:
    return (gen + 1) & 0xFFFF


# pool -> the key that sizes it, for "out of ids" errors (next hops have no key)
_LIMIT_KEYS = {"VIP": "lb.max_vips", "ring": "lb.max_vips", "backend": "lb.max_backends"}


class Records:
    """VIP records by ident, free ids, backend generations, and what was last written of
    the next hops, the egress settings and the QUIC filter."""

    def __init__(self, limits: Limits):
        self.vips: dict[tuple, VipRecord] = {}
        self.free_vip = collections.deque(range(1, limits.max_vips))
        self.free_ring = collections.deque(range(1, 2 * limits.max_vips))
        self.free_be = collections.deque(range(1, limits.max_backends))
        self.free_nh = collections.deque(range(1, limits.max_nexthops))
        self.nexthops: dict[str, int] = {}  # next-hop key -> id
        self.gen: dict[int, int] = {}  # backend id -> generation (see struct backend)
        self.macs: dict[int, bytes] = {}
        self.egress: Optional[EgressConfig] = None
        self.quic_filter: set = set()  # filter entries written
        self.quic_resync = False  # quic_servers to be read back (after adopt or a raise)

    def copy(self) -> "Records":
        new = object.__new__(Records)
        new.__dict__.update(self.__dict__)
        new.vips = {ident: v.copy() for ident, v in self.vips.items()}
        for name in ("free_vip", "free_ring", "free_be", "free_nh"):
            setattr(new, name, collections.deque(getattr(self, name)))
        new.nexthops, new.gen, new.macs = dict(self.nexthops), dict(self.gen), dict(self.macs)
        new.quic_filter = set(self.quic_filter)
        return new

    def restore(self, saved: "Records") -> None:
        """Back to `saved` (a copy() taken earlier), in place."""
        self.__dict__.update(saved.copy().__dict__)

    def drop_free(self, **used: set) -> None:
        """Ids in use (kind: vip, ring, backend, nexthop) leave their free pools."""
        for kind, ids in used.items():
            name = "free_" + {"backend": "be", "nexthop": "nh"}.get(kind, kind)
            setattr(self, name, collections.deque(i for i in getattr(self, name)
                                                  if i not in ids))

    def take(self, pool: collections.deque, what: str) -> int:
        if not pool:
            key = _LIMIT_KEYS.get(what)
            # while an apply runs, ids of what it removes are not free yet
            raise XdplbError(f"out of {what} ids (old and new entries are held side by "
                             f"side until an apply is done): "
                             + (f"raise {key}" if key else "apply the change in steps"))
        return pool.popleft()

    def nexthop_id(self, key: str) -> int:
        nid = self.nexthops.get(key)
        if nid is None:
            nid = self.nexthops[key] = self.take(self.free_nh, "next-hop")
        return nid

    def in_use(self) -> dict[str, set]:
        """Ids and entries these records hold: VIP idents, ring ids, backend ids (what a
        rollback must clear when the records it returns to lack them; next-hop MACs it
        puts back from the writer's journal)."""
        out = {"vip": set(self.vips), "ring": set(), "backend": set()}
        for v in self.vips.values():
            if v.ring_id:
                out["ring"].add(v.ring_id)
            out["backend"].update(v.bids.values())
        return out

    def forget(self, touched_rings: Optional[set] = None) -> None:
        """Believe nothing written: the next apply rewrites every entry (map writes are
        idempotent); ids and generations stay. Given `touched_rings` (ring ids written
        or removed since the records were right), the other rings are believed: each
        ring rewritten costs an RCU grace period."""
        self.macs.clear()
        self.egress = None
        self.quic_resync = True
        for cur in self.vips.values():
            cur.spec = None
            if touched_rings is None or not cur.ring_id or cur.ring_id in touched_rings:
                cur.digest = None
            cur.written = dict.fromkeys(cur.bids.values(), UNKNOWN)
