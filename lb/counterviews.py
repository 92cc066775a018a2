"""The data path's packet and byte counters: the global ones (per-CPU `stats`), and each
VIP's and backend's, read and moved through the mmaps of `vip_stats` and `backends`."""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Iterable

from . import layout
from .native import Map

GLOBAL_NAMES = {s.name.lower(): s for s in layout.Stat}
_COUNTERS = struct.Struct("=QQ")  # struct lb_counters


def global_counters(stats: Map) -> dict[str, int]:
    """The `stats` map's counters by name, summed over CPUs."""
    sums = [0] * layout.GLOBAL_SLOTS
    for raw in stats.lookup_percpu(ctypes.c_uint32(0)):
        g = layout.Global.unpack(raw)
        for i in range(layout.GLOBAL_SLOTS):
            sums[i] += g.c[i]
    return {name: sums[int(s)] for name, s in GLOBAL_NAMES.items()}


class CounterViews:
    """Counters of kind "vip" (vip_stats: one block per CPU, and one for the counts of
    removed backends) and "backend" (beside each backend's entry, one block per CPU),
    in the maps' mmaps `views` (by map name)."""

    def __init__(self, views: dict[str, mmap.mmap], limits, ncpus: int):
        self._views = views
        # kind -> (map, stride, blocks, element size, offset of the counters in an element)
        self._maps = {
            "vip": ("vip_stats", limits.max_vips, ncpus + 1,
                    ctypes.sizeof(layout.Counters), 0),
            "backend": ("backends", limits.max_backends, ncpus,
                        ctypes.sizeof(layout.BackendSlot), layout.BackendSlot.c.offset)}

    def _offsets(self, kind: str, idx: int) -> tuple[mmap.mmap, list[int]]:
        """The view and the offsets of counter `idx` in every block."""
        m, stride, blocks, size, at = self._maps[kind]
        if not 0 <= idx < stride:
            raise ValueError(f"{kind} counter {idx} out of range 0..{stride - 1}")
        return self._views[m], [(blk * stride + idx) * size + at for blk in range(blocks)]

    def read(self, kind: str, idx: int) -> tuple[int, int]:
        """(packets, bytes) of counter `idx`, summed over blocks (read through the mmap)."""
        view, offsets = self._offsets(kind, idx)
        p = b = 0
        for off in offsets:
            cp, cb = _COUNTERS.unpack_from(view, off)
            p += cp
            b += cb
        return p, b

    def vip(self, vip_id: int, bids: Iterable[int]
            ) -> tuple[tuple[int, int], dict[int, tuple[int, int]]]:
        """A VIP's (packets, bytes) and its backends' (each read once): a sent packet is
        counted for its backend only, so the VIP's total is its own counter (packets for
        it not sent, and the counts of backends removed from it) plus its current
        backends `bids`."""
        per = {bid: self.read("backend", bid) for bid in bids}
        p, b = self.read("vip", vip_id)
        return (p + sum(x[0] for x in per.values()), b + sum(x[1] for x in per.values())), per

    def retire(self, bid: int, vip_id: int) -> list[tuple[int, int]]:
        """Move backend `bid`'s counts into its VIP's own counter (the removed backends'
        block), so the VIP's total does not drop when the backend leaves it. Returns the
        counts moved, per CPU."""
        view, offsets = self._offsets("backend", bid)
        moved = [_COUNTERS.unpack_from(view, off) for off in offsets]
        self._add_removed(vip_id, sum(p for p, _ in moved), sum(b for _, b in moved))
        self.reset("backend", bid)
        return moved

    def unretire(self, bid: int, vip_id: int, moved: list[tuple[int, int]]) -> None:
        """Undo retire (a rejected reload puts the backend back)."""
        self._add_removed(vip_id, -sum(p for p, _ in moved), -sum(b for _, b in moved))
        view, offsets = self._offsets("backend", bid)
        for off, (mp, mb) in zip(offsets, moved):
            p, b = _COUNTERS.unpack_from(view, off)
            _COUNTERS.pack_into(view, off, p + mp, b + mb)

    def _add_removed(self, vip_id: int, packets: int, nbytes: int) -> None:
        view, offsets = self._offsets("vip", vip_id)
        p, b = _COUNTERS.unpack_from(view, offsets[-1])
        _COUNTERS.pack_into(view, offsets[-1], p + packets, b + nbytes)

    def reset(self, kind: str, idx: int) -> None:
        """kind: "vip" or "backend" (whose counters sit beside its entries)."""
        view, offsets = self._offsets(kind, idx)
        for off in offsets:
            _COUNTERS.pack_into(view, off, 0, 0)
