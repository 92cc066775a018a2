"""The rings map: each VIP's Maglev ring is an inner array map in rings[ring_id], written
whole and swapped in, and read back (by the daemon, `explain` and the tests)."""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import struct
from typing import Optional

from . import layout
from .layout import IPAddress
from .native import BPF_MAP_TYPE_ARRAY, Map, create_map, lib

RING_FLAGS = lib.BPF_F_INNER_MAP | lib.BPF_F_MMAPABLE  # every ring's inner map
# The last element's slots past the ring's end hold PAD_ID, which no backend id can be
# (ids are below lb.max_backends <= 1 << 24) and which read_ring strips: the ring's size
# is then known from its map alone. The data path never reads them (slot < ring_size).
# 16-bit rings pad with 0xffff too, but that can be an id: their size is in the trailing
# element (layout.RingLayout.sized).
PAD_ID = layout.RING32.pad
_SIZE = struct.Struct("=I")  # the ring's size, first in a sized ring's last element


def _image(ids: array.array, ring: layout.RingLayout) -> bytes:
    """The ring as its inner map holds it: the ids, padded to whole elements, and for a
    sized layout the element with the ring's size."""
    image = array.array(ring.typecode, ids)
    image.extend([ring.pad] * (-len(ids) % ring.ids))
    tail = b""
    if ring.sized:
        tail = _SIZE.pack(len(ids)).ljust(ctypes.sizeof(ring.chunk), b"\0")
    return image.tobytes() + tail


def _mapped(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def create_inner(ring: layout.RingLayout, name: str, elements: int) -> Map:
    """An empty inner map of the `ring` layout (what `rings` accepts is the same kind)."""
    return create_map(BPF_MAP_TYPE_ARRAY, name, 4, ctypes.sizeof(ring.chunk), elements,
                      map_flags=RING_FLAGS)


def install_rings(rings_map: Map, rings: list[tuple[int, array.array]],
                  ring: layout.RingLayout, chunk: int = 256) -> None:
    """Fill a new inner map per ring completely (one memcpy into its mmap), then swap
    them into their rings[ring_id] slots: packets see a VIP's whole old ring or its
    whole new one, never a mix. The swaps go in batches, since the kernel waits for
    an RCU grace period after each map-in-map update call (~14 ms here). `ring`: the
    layout the loaded program reads (Datapath.ring_layout)."""
    for start in range(0, len(rings), chunk):
        part = rings[start:start + chunk]
        inners: list[Map] = []
        try:
            for ring_id, ids in part:
                image = _image(ids, ring)
                inner = create_inner(ring, f"ring_{ring_id}", ring.elements(len(ids)))
                inners.append(inner)
                with mmap.mmap(inner.fd, _mapped(len(image)), mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                    mm[: len(image)] = image
            keys = array.array("I", [v for v, _ in part])
            fds = array.array("I", [i.fd for i in inners])
            rings_map.update_batch(keys.tobytes(), fds.tobytes(), len(part))
        finally:
            for inner in inners:
                inner.close()


def _layout_of(inner: Map) -> Optional[layout.RingLayout]:
    return next((r for r in layout.RING_LAYOUTS
                 if ctypes.sizeof(r.chunk) == inner.value_size), None)


def read_ring(rings: Map, ring_id: int) -> Optional[array.array]:
    """The ring in rings[ring_id] as backend ids (None: no ring there, or it was swapped
    out while being read). The one ring reader: Datapath.read_ring, pinned_ring. An
    inner map's element size says its layout (the kernel keeps one size per `rings`)."""
    raw = rings.lookup(ctypes.c_uint32(ring_id))
    if raw is None:
        return None
    fd = lib.bpf_map_get_fd_by_id(ctypes.c_uint32.from_buffer_copy(raw).value)
    if fd < 0:
        return None
    with Map.from_fd(fd) as inner:
        ring = _layout_of(inner)
        if ring is None:
            return None
        elements, size = inner.max_entries, inner.max_entries * inner.value_size
        with mmap.mmap(inner.fd, _mapped(size), mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            image = mm[:size]
    if ring.sized:
        slots = (elements - 1) * ring.ids
        length = _SIZE.unpack_from(image, size - ctypes.sizeof(ring.chunk))[0]
        if not slots - ring.ids < length <= slots:
            return None  # not a ring this layout wrote
        return array.array("I", array.array(ring.typecode, image[: length * ring.bits // 8]))
    ids = array.array("I", image)
    pad = 0
    while pad < min(len(ids), ring.ids - 1) and ids[-1 - pad] == ring.pad:
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
