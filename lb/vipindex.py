"""`vip_index`: the data path's direct-mapped copy of `vips` (struct vip_slot), kept by
user space beside it. `vips` stays the truth; the index only answers for it:

- a slot holds the least (as bytes) of the keys that hash there, with that key's entry
  (so what it holds depends on `vips` alone), or is empty when none does (then the data
  path takes "no VIP" without asking `vips`); other keys that hash to a taken slot are
  found in `vips` (the data path asks it when the slot's key is not the packet's);
- an entry is written into `vips` before its slot, and a slot is cleared, or handed to
  another key of that slot, before its key leaves `vips`: a packet never finds in the
  index a key that `vips` does not hold, nor misses one it does for longer than the
  write of the entry itself takes;
- a slot is rewritten seqlock style (seq odd, then the new body, then seq even again,
  three whole-value updates), so a packet that reads a slot while it changes asks `vips`
  instead of using a mix of old and new.
"""

from __future__ import annotations

import ctypes
from typing import Iterable, Optional

from .flowhash import vip_slot_hash
from .layout import VipKey, VipMeta, VipSlot
from .native import Map


def slots_for(max_vips: int) -> int:
    """vip_index's size: a power of two, at least twice max_vips (few keys share a slot)."""
    return 1 << (2 * max_vips - 1).bit_length()


class VipIndex:
    """Writes `index` (a vip_index map of a power-of-two size) after `vips`' changes."""

    def __init__(self, index: Map):
        self.map = index
        self.mask = index.max_entries - 1
        self._keys: dict[int, dict[bytes, bytes]] = {}  # slot -> {key: entry} in `vips`
        self._slots: dict[int, VipSlot] = {}  # slot -> what it holds (as last written)

    def slot_of(self, key: bytes) -> int:
        return vip_slot_hash(key) & self.mask

    def held(self, slot: int) -> Optional[bytes]:
        """The key slot `slot` holds (None: empty)."""
        s = self._slots.get(slot)
        return bytes(s.key) if s is not None and s.key.family else None

    def sync(self, entries: Iterable[tuple[bytes, bytes]], adopted: bool) -> None:
        """Make the index answer for `entries` (all of `vips`); adopted: it may hold what
        an earlier instance wrote, read every slot first."""
        for key, meta in entries:
            self._keys.setdefault(self.slot_of(key), {})[bytes(key)] = bytes(meta)
        if adopted:
            for slot in range(self.mask + 1):
                raw = self.map.lookup(ctypes.c_uint32(slot))
                if raw is not None and any(raw):
                    self._slots[slot] = VipSlot.unpack(raw)
        for slot in set(self._slots) | set(self._keys):
            self._settle(slot)

    def set(self, key: bytes, meta: bytes) -> None:
        """After `vips`[key] = meta."""
        slot = self.slot_of(key)
        self._keys.setdefault(slot, {})[bytes(key)] = bytes(meta)
        self._settle(slot)

    def delete(self, key: bytes) -> None:
        """Before `vips`[key] is deleted."""
        slot = self.slot_of(key)
        keys = self._keys.get(slot, {})
        keys.pop(bytes(key), None)
        if not keys:
            self._keys.pop(slot, None)
        self._settle(slot)

    def _settle(self, slot: int) -> None:
        """The slot to hold the least of its keys (so what the index holds depends on
        `vips` alone, not on the order of writes), with its entry; or to be empty."""
        keys = self._keys.get(slot, {})
        key = min(keys) if keys else None
        have = self._slots.get(slot)
        if have is None and key is None:
            return  # never written: empty
        if (have is not None and not have.seq & 1 and self.held(slot) == key
                and (key is None or bytes(have.meta) == keys[key])):
            return
        self._write(slot, key)

    def _write(self, slot: int, key: Optional[bytes]) -> None:
        """Slot `slot` to hold `key` with its entry (None: empty): seq odd with the body
        it has, the new body, seq even."""
        new, old = VipSlot(), self._slots.get(slot, VipSlot())
        if key is not None:
            new.key = VipKey.unpack(key)
            new.meta = VipMeta.unpack(self._keys[slot][key])
        seq = old.seq + (old.seq & 1)  # odd: a write that raised; readers ask `vips`
        idx = ctypes.c_uint32(slot)
        for body, n in ((VipSlot.unpack(bytes(old)), seq + 1), (new, seq + 1), (new, seq + 2)):
            body.seq = n & 0xFFFFFFFF
            self.map.update(idx, body)
            self._slots[slot] = VipSlot.unpack(bytes(body))
