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

RING_FLAGS = lib.BPF_F_INNER_MAP | lib.BPF_F_MMAPABLE  # every ring's inner map
CHUNK_BYTES = ctypes.sizeof(layout.RingChunk)  # one element: RING_CHUNK ids, a cache line
# The last element's slots past the ring's end hold PAD_ID, which no backend id can be
# (ids are below lb.max_backends <= 1 << 24) and which read_ring strips: the ring's size
# is then known from its map alone. The data path never reads them (slot < ring_size).
PAD_ID = 0xFFFFFFFF


def _image(ids: array.array) -> array.array:
    """The ring as its inner map holds it: the ids, padded to whole elements."""
    image = array.array("I", ids)
    image.extend([PAD_ID] * (-len(ids) % layout.RING_CHUNK))
    return image


def _mapped(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


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
                image = _image(ids)
                inner = create_map(BPF_MAP_TYPE_ARRAY, f"ring_{ring_id}", 4, CHUNK_BYTES,
                                   len(image) * 4 // CHUNK_BYTES, map_flags=RING_FLAGS)
                inners.append(inner)
                with mmap.mmap(inner.fd, _mapped(len(image) * 4), mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                    mm[: len(image) * 4] = image.tobytes()
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
        size = inner.max_entries * CHUNK_BYTES
        with mmap.mmap(inner.fd, _mapped(size), mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            ids = array.array("I", mm[:size])
    pad = 0
    while pad < min(len(ids), layout.RING_CHUNK - 1) and ids[-1 - pad] == PAD_ID:
        pad += 1
    return ids[: len(ids) - pad]


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
