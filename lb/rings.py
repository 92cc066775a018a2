"""The rings map: each VIP's Maglev ring is an inner array map in rings[ring_id], written
whole and swapped in, and read back (by the daemon, `explain` and the tests)."""

from __future__ import annotations

import array
import ctypes
import mmap
import os
from typing import Optional

from . import layout
from .layout import IPAddress
from .native import BPF_MAP_TYPE_ARRAY, Map, create_map, lib


def install_rings(rings_map: Map, rings: list[tuple[int, array.array]], chunk: int = 256
                  ) -> None:
    """Fill a new inner map per ring completely (one memcpy into its mmap), then swap
    them into their rings[ring_id] slots: packets see a VIP's whole old ring or its
    whole new one, never a mix. The swaps go in batches, since the kernel waits for
    an RCU grace period after each map-in-map update call (~14 ms here)."""
    for start in range(0, len(rings), chunk):
        part = rings[start:start + chunk]
        inners: list[Map] = []
        try:
            for ring_id, ids in part:
                m = len(ids)
                inner = create_map(BPF_MAP_TYPE_ARRAY, f"ring_{ring_id}", 4, 4, m,
                                   map_flags=lib.BPF_F_INNER_MAP | lib.BPF_F_MMAPABLE)
                inners.append(inner)
                # array elements are 8-byte aligned: a u32 ring is a stride-8 image
                image = array.array("I", bytes(8 * m))
                image[0::2] = ids
                size = -(-8 * m // mmap.PAGESIZE) * mmap.PAGESIZE
                with mmap.mmap(inner.fd, size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                    mm[: 8 * m] = image.tobytes()
            keys = array.array("I", [v for v, _ in part])
            fds = array.array("I", [i.fd for i in inners])
            rings_map.update_batch(keys.tobytes(), fds.tobytes(), len(part))
        finally:
            for inner in inners:
                inner.close()


def read_ring(rings: Map, ring_id: int) -> Optional[array.array]:
    """The ring in rings[ring_id] as backend ids (None: no ring there, or it was swapped
    out while being read). The one ring reader: Datapath.read_ring, pinned_ring."""
    raw = rings.lookup(ctypes.c_uint32(ring_id))
    if raw is None:
        return None
    fd = lib.bpf_map_get_fd_by_id(ctypes.c_uint32.from_buffer_copy(raw).value)
    if fd < 0:
        return None
    with Map.from_fd(fd) as inner:
        m = inner.max_entries
        size = -(-8 * m // mmap.PAGESIZE) * mmap.PAGESIZE
        with mmap.mmap(inner.fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            return array.array("I", mm[: 8 * m])[0::2]  # stride 8: see install_rings


def pinned_ring(pin_dir: str, addr: IPAddress, port: int, proto: int
                ) -> Optional[array.array]:
    """The ring a running instance uses for a VIP, read from the maps pinned in `pin_dir`
    (None: the VIP has no ring, or it is being swapped: read again). KeyError: no VIP."""
    with Map.from_pin(os.path.join(pin_dir, "vips")) as vips:
        raw = vips.lookup(layout.vip_key(addr, port, proto))
    if raw is None:
        raise KeyError(f"{addr}:{port}/{proto} is not in {pin_dir}/vips")
    entry = layout.vip_entry(raw)
    with Map.from_pin(os.path.join(pin_dir, "rings")) as rings:
        ring = read_ring(rings, entry.ring_id)
    return ring if ring is None or len(ring) == entry.ring_size else None
