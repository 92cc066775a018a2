"""The connection table `flows` (bpf/flowtable.h) as user space reads it: through an mmap
of the array, bucket by bucket, placed by the data path's own slot hash (bpf/flowhash.h,
compiled into lb._native). Edits (put, delete, clear) are for tests and tools; they take
a slot the way the data path does (odd seq while writing), but are not meant to race with
busy traffic."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import struct
from typing import Iterator, Optional

from . import layout
from .native import Map, ffi, lib

WAYS = layout.FLOW_WAYS
SLOT = ctypes.sizeof(layout.FlowSlot)
_FAMILY = layout.FlowSlot.key.offset + layout.FlowKey.family.offset  # 0: an empty slot
_SEQ = layout.FlowSlot.seq.offset
_U32 = struct.Struct("=I")


def buckets_for(entries: int) -> int:
    """Buckets (elements of `flows`, WAYS slots each) of a table for `entries` flows."""
    return max(1, -(-entries // WAYS))


class FlowTable:
    def __init__(self, flows: Map):
        self.buckets = flows.max_entries
        self.slots = self.buckets * WAYS
        size = -(-SLOT * self.slots // mmap.PAGESIZE) * mmap.PAGESIZE
        self.view = mmap.mmap(flows.fd, size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self) -> None:
        self.view.close()

    def probe(self, fk: layout.FlowKey) -> list[int]:
        """The slots fk may sit in, in the data path's probe order (its own slot first)."""
        h = lib.xdplb_flow_slot_hash(ffi.from_buffer("uint32_t[]", bytearray(fk)))
        base = ((h * self.buckets) >> 32) * WAYS
        own = h & (WAYS - 1)
        return [base + ((own + i) & (WAYS - 1)) for i in range(WAYS)]

    def slot(self, idx: int) -> layout.FlowSlot:
        return layout.FlowSlot.from_buffer_copy(self.view, idx * SLOT)

    def _find(self, fk: layout.FlowKey) -> Iterator[int]:
        want = bytes(fk)
        for idx in self.probe(fk):
            s = self.slot(idx)
            if s.key.family and bytes(s.key) == want:
                yield idx

    def lookup(self, fk: layout.FlowKey) -> Optional[layout.FlowVal]:
        for idx in self._find(fk):
            return self.slot(idx).val
        return None

    def _write(self, idx: int, s: layout.FlowSlot) -> None:
        off = idx * SLOT
        seq = _U32.unpack_from(self.view, off + _SEQ)[0] | 1
        _U32.pack_into(self.view, off + _SEQ, seq)  # odd while written: readers retry
        raw = bytes(s)
        self.view[off:off + _SEQ] = raw[:_SEQ]
        self.view[off + _SEQ + 4:off + SLOT] = raw[_SEQ + 4:]
        _U32.pack_into(self.view, off + _SEQ, seq + 1)

    def put(self, fk: layout.FlowKey, val: layout.FlowVal) -> None:
        """Write fk's entry: where it is, else its own slot if free, else the bucket's
        first free slot, else its own slot."""
        probe = self.probe(fk)
        where = next(self._find(fk), None)
        if where is None:
            free = [i for i in probe if not self.slot(i).key.family]
            where = free[0] if free else probe[0]
        self._write(where, layout.FlowSlot(key=fk, val=val))

    def relocate(self, fk: layout.FlowKey) -> None:
        """Move fk's entry from its own slot to another slot of its bucket (swapping with
        what is there), so its next packet finds it by the bucket scan: for tests of that
        path."""
        own, other = self.probe(fk)[:2]
        a, b = self.slot(own), self.slot(other)
        if bytes(a.key) != bytes(fk):
            raise KeyError("the flow is not in its own slot")
        self._write(other, a)
        self._write(own, b)

    def delete(self, fk: layout.FlowKey) -> None:
        """Forget fk, as an eviction does."""
        for idx in list(self._find(fk)):
            self._write(idx, layout.FlowSlot())

    def _families(self) -> bytes:
        return self.view[_FAMILY:self.slots * SLOT:SLOT]

    def count(self) -> int:
        return self.slots - self._families().count(0)

    def keys(self) -> set[bytes]:
        """The keys of every flow held (as bytes)."""
        return {bytes(self.slot(idx).key) for idx, family in enumerate(self._families())
                if family}

    def clear(self) -> None:
        for idx, family in enumerate(self._families()):
            if family:
                self._write(idx, layout.FlowSlot())


@contextlib.contextmanager
def pinned(path: str) -> Iterator[FlowTable]:
    """The table a running (or killed) instance pinned at `path`."""
    with Map.from_pin(path) as flows:
        table = FlowTable(flows)
    try:
        yield table
    finally:
        table.close()
