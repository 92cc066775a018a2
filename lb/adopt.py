"""Whether a map an earlier instance left pinned fits this one, checked fully before it
is adopted: its shape (type, key and value sizes, entries, flags), for `rings` the layout
of the inner maps it accepts, and for `vips` the ids its entries carry. A pin that does
not fit is replaced (the daemon logs pinned_map_replaced with the reason), never used:
a foreign or corrupted map must not break start-up or `stats` later."""

from __future__ import annotations

import ctypes
import errno
from typing import Optional

from . import layout
from .errors import BpfError
from .native import Map
from .rings import create_inner

BPF_F_RDONLY_PROG = 1 << 7


def misfit(name: str, old: Map, want: dict, limits) -> Optional[str]:
    """Why the pinned map `name` cannot be adopted, or None. `want` is the skeleton's
    spec of that map, `limits` the Datapath's Limits."""
    have = old.info()
    # the kernel adds BPF_F_RDONLY_PROG to DEVMAPs by itself
    have["map_flags"] &= ~BPF_F_RDONLY_PROG
    want = dict(want, map_flags=want["map_flags"] & ~BPF_F_RDONLY_PROG)
    diff = [f"{k} {have[k]} != {want[k]}" for k in want if have[k] != want[k]]
    if diff:
        return ", ".join(diff)
    if name == "rings":
        return _ring_layout_misfit(old, limits)
    if name == "vips":
        return _vip_ids_misfit(old, limits)
    return None


def _refused(rings: Map, slot: int, ring: layout.RingLayout) -> bool:
    """Whether `rings` refuses an inner map of the `ring` layout in its free `slot`."""
    with create_inner(ring, "ring_check", 1) as probe:
        try:
            rings.update(ctypes.c_uint32(slot), ctypes.c_uint32(probe.fd))
        except BpfError as e:
            if e.errno in (errno.EINVAL, errno.EBADF):
                return True
            raise
        rings.delete(ctypes.c_uint32(slot))
    return False


def _ring_layout_misfit(rings: Map, limits) -> Optional[str]:
    """The kernel checks an inner map against the outer map's template only when one is
    stored: store one of ours in a free slot (no VIP points there) and take it out. An
    older xdplb's rings (one u32 id per element), and rings of the other id width (an
    instance with another lb.max_backends), are refused here, never misread."""
    free = next((i for i in range(rings.max_entries)
                 if rings.lookup(ctypes.c_uint32(i)) is None), None)
    if free is None:
        return "no free slot to check its inner map layout"
    want = layout.ring_layout(limits.max_backends)
    if not _refused(rings, free, want):
        return None
    other = next(r for r in layout.RING_LAYOUTS if r is not want)
    if not _refused(rings, free, other):
        return (f"its rings hold {other.bits}-bit backend ids, and lb.max_backends "
                f"{limits.max_backends} needs {want.bits}-bit ones (lb.max_backends "
                "changed across 65536: the rings are rebuilt)")
    return ("its inner maps have another layout (an array of "
            f"{ctypes.sizeof(want.chunk)}-byte ring chunks is refused)")


def _vip_ids_misfit(vips: Map, limits) -> Optional[str]:
    """Every entry's VIP id and ring id within this instance's ranges, each used once,
    and a known address family."""
    seen_vip, seen_ring = set(), set()
    for k, v in vips.items():
        key, meta = layout.VipKey.unpack(k), layout.VipMeta.unpack(v)
        where = f"an entry (vip_id {meta.vip_id}, ring_id {meta.ring_id})"
        if key.family not in (layout.AF_INET, layout.AF_INET6):
            return f"{where} has address family {key.family}"
        if not 0 < meta.vip_id < limits.max_vips or meta.vip_id in seen_vip:
            return f"{where}: vip_id outside 1..{limits.max_vips - 1} or used twice"
        if meta.ring_id and (meta.ring_id >= 2 * limits.max_vips or meta.ring_id in seen_ring):
            return f"{where}: ring_id outside 1..{2 * limits.max_vips - 1} or used twice"
        seen_vip.add(meta.vip_id)
        if meta.ring_id:
            seen_ring.add(meta.ring_id)
    return None
