"""The loaded xdplb program and typed operations on its maps.

This module knows map names, key encodings and flag bits (lb/layout.py); its methods take
plain values and decide nothing. What goes in the maps (ids, rings, states) is decided by
lb/programmer.py. The rings map's inner maps are lb/rings.py, the counters
lb/counterviews.py.
"""

from __future__ import annotations

import array
import ctypes
import ipaddress
import mmap
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from . import layout
from .adopt import misfit
from .counterviews import CounterViews, global_counters
from .flowhash import prefilter_index
from .flowtable import FlowTable, buckets_for
from .layout import BackendEntry, IPAddress, VipEntry
from .native import Map, Skeleton, num_cpus
from .pindir import PinDir
from .rings import install_rings, read_ring
from .vipindex import VipIndex, slots_for

# A map adopted only together with the one it depends on (listed before it in MAP_NAMES):
# `flows` entries name backend ids and generations that only `backends` knew; `vip_index`
# copies `vips`, and an index kept beside a new `vips` would be emptied under a program of
# the earlier instance that may still be attached and reading it.
ADOPT_WITH = {"flows": "backends", "vip_index": "vips"}

MAP_NAMES = ("vips", "vip_index", "vip_addrs", "prefilter", "rings", "backends", "nexthops",
             "flows", "config", "tx_port", "stats", "vip_stats", "quic_servers",
             "quic_filter", "quic_epoch")

@dataclass(frozen=True)
class Limits:
    """Map sizes, fixed at load time."""

    max_vips: int = 4096
    max_backends: int = 65536
    max_nexthops: int = 4096
    flow_table_size: int = 65536  # flows; the table has buckets of FLOW_WAYS slots


@dataclass(frozen=True)
class EgressConfig:
    smac: bytes = bytes(6)
    encap: int = layout.ENCAP_IPIP
    tx_mode: int = layout.TX_XDP_TX
    source_v4: Optional[ipaddress.IPv4Address] = None
    source_v6: Optional[ipaddress.IPv6Address] = None
    gue_port: int = 6080
    mtu: int = 1500
    flow_insert_limit: int = 0  # new flow-table entries per second per CPU; 0: no limit
    answer_ping: bool = True    # echo requests to a VIP address answered by the data path
    too_big_per_sec: int = 1000  # ICMP too-big answers per second per CPU; 0: none
    tx_port: Optional[int] = None  # ifindex XDP_REDIRECT sends to (tx_mode TX_REDIRECT);
    #                                None with XDP_TX
    if_mac: bytes = bytes(6)  # the attached interface's MAC: VIP frames to another
    #                           unicast MAC pass; zero: no check

    def __post_init__(self):
        if (self.tx_port is None) != (self.tx_mode == layout.TX_XDP_TX):
            raise ValueError("egress: tx_port is the XDP_REDIRECT target, and only that")


def _u32(v: int) -> ctypes.c_uint32:
    return ctypes.c_uint32(v)


class Datapath:
    """Open, size and load bpf/lb.bpf.c; then read and write its maps."""

    def __init__(self, limits: Limits = Limits(), pin_dir: Optional[str] = None):
        """With pin_dir, compatible maps pinned there by an earlier instance are adopted
        (flows, counters, VIPs and rings kept; see .adopted), incompatible ones replaced
        (reasons in .replaced), and every map ends up pinned there."""
        self.limits = limits
        self.pin_dir = pin_dir
        self.adopted: list[str] = []
        self.replaced: dict[str, str] = {}
        self.pins: Optional[PinDir] = None
        self.skel = Skeleton("lb")
        try:
            self.skel.set_max_entries("vips", limits.max_vips)
            self.skel.set_max_entries("vip_index", slots_for(limits.max_vips))
            self.skel.rodata.vip_index_mask = slots_for(limits.max_vips) - 1
            self.skel.set_max_entries("vip_addrs", limits.max_vips)
            self.skel.set_max_entries("rings", 2 * limits.max_vips)
            # rings of 16-bit ids when every backend id fits (half the memory)
            self.ring_layout = layout.ring_layout(limits.max_backends)
            self.skel.rodata.ring_ids16 = self.ring_layout is layout.RING16
            self.skel.set_inner_value_size("rings", ctypes.sizeof(self.ring_layout.chunk))
            # flat per-CPU arrays: CPU c's element i is element c * stride + i
            self.ncpus = num_cpus()
            self.skel.set_max_entries("backends", limits.max_backends * self.ncpus)
            # one block per CPU, and one more for the counts of removed backends
            self.skel.set_max_entries("vip_stats", limits.max_vips * (self.ncpus + 1))
            self.skel.rodata.vip_stats_stride = limits.max_vips
            self.skel.rodata.backends_stride = limits.max_backends
            self.skel.set_max_entries("nexthops", limits.max_nexthops)
            self.skel.set_max_entries("quic_servers", limits.max_backends)  # one per pair
            self.skel.set_max_entries("quic_cache", layout.QUIC_CACHE_SLOTS * self.ncpus)
            buckets = buckets_for(limits.flow_table_size)
            self.skel.set_max_entries("flows", buckets)
            self.skel.rodata.flow_buckets = buckets
            if pin_dir:
                self.pins = PinDir(pin_dir)
                self._adopt_pins()
            self.skel.load()
        except BaseException:
            self.skel.close()
            if self.pins is not None:
                self.pins.close()
            raise
        self.maps: dict[str, Map] = {n: self.skel.map(n) for n in MAP_NAMES}
        self.prog_fd = self.skel.prog_fd("xdplb")
        self._views: dict[str, mmap.mmap] = {}
        self.flows: Optional[FlowTable] = None
        try:
            for name in ("vip_stats", "backends"):
                m = self.maps[name]
                size = -(-m.value_size * m.max_entries // mmap.PAGESIZE) * mmap.PAGESIZE
                self._views[name] = mmap.mmap(m.fd, size, mmap.MAP_SHARED,
                                              mmap.PROT_READ | mmap.PROT_WRITE)
            self.flows = FlowTable(self.maps["flows"])
            self.counters = CounterViews(self._views, limits, self.ncpus)
            self.vip_index = VipIndex(self.maps["vip_index"])
            self.vip_index.sync(self.maps["vips"].items(), "vip_index" in self.adopted)
        except BaseException:
            self.close()
            raise
        if self.pins is not None:
            for name in MAP_NAMES:
                if name not in self.adopted:
                    self.pins.pin(self.maps[name].fd, name)

    def _adopt_pins(self) -> None:
        for name in MAP_NAMES:
            what = self.pins.kind(name)
            if what is None:
                continue
            if what != "pin":
                self.pins.clear(name)
                self.replaced[name] = f"a {what}, not a pinned map"
                continue
            with Map.from_fd(self.pins.get(name)) as old:
                why = misfit(name, old, self.skel.map_spec(name), self.limits)
                if not why and name in ADOPT_WITH and ADOPT_WITH[name] not in self.adopted:
                    why = f"{ADOPT_WITH[name]} not adopted"
                if why:
                    self.replaced[name] = why
                    self.pins.clear(name)
                    continue
                self.skel.reuse_map_fd(name, old.fd)
                self.adopted.append(name)
        what = self.pins.kind("prog")
        if what == "pin":  # an earlier instance's program: ours to replace or unpin
            self.pins.owned.add("prog")
        elif what is not None:  # it would fail the pin after attaching
            self.pins.clear("prog")
            self.replaced["prog"] = f"a {what}, not a pinned program"

    def pin_program(self) -> None:
        self.pins.clear("prog")
        self.pins.pin(self.prog_fd, "prog")

    def unpin_all(self) -> None:
        """Remove what this instance pinned or adopted, and the directory when empty."""
        if self.pins is None:
            return
        for name in list(MAP_NAMES) + ["prog"]:
            self.pins.unpin(name)
        self.pins.remove()

    def close(self) -> None:
        for v in getattr(self, "_views", {}).values():
            v.close()
        self._views = {}
        if getattr(self, "flows", None) is not None:
            self.flows.close()
            self.flows = None
        self.skel.close()
        if self.pins is not None:
            self.pins.close()

    def __enter__(self) -> "Datapath":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- configuration -------------------------------------------------------------
    def set_config(self, cfg: EgressConfig) -> None:
        c = layout.LbConfig()
        c.smac[:] = cfg.smac
        c.encap = cfg.encap
        c.tx_mode = cfg.tx_mode
        c.src_v4 = layout.addr_words(cfg.source_v4)[0] if cfg.source_v4 else 0
        if cfg.source_v6:
            c.src_v6[:] = layout.addr_words(cfg.source_v6)
        c.gue_port = layout.port_be(cfg.gue_port)
        c.mtu = min(cfg.mtu, 0xFFFF)
        c.flow_insert_limit = cfg.flow_insert_limit
        c.too_big_per_sec = cfg.too_big_per_sec
        c.answer_ping = int(cfg.answer_ping)
        c.if_mac[:] = cfg.if_mac
        self.maps["config"].update(_u32(0), c)

    def set_tx_port(self, ifindex: int) -> None:
        self.maps["tx_port"].update(_u32(0), _u32(ifindex))

    def set_nexthop(self, nid: int, mac: bytes) -> None:
        nh = layout.Nexthop()
        nh.dmac[:] = mac
        self.maps["nexthops"].update(_u32(nid), nh)

    def nexthop_mac(self, nid: int) -> bytes:
        """The MAC next hop `nid` holds (all zero: none)."""
        return bytes(layout.Nexthop.unpack(self.maps["nexthops"].lookup(_u32(nid))).dmac)

    def set_backend(self, bid: int, addr: IPAddress, vip_id: int, nexthop_id: int,
                    keep_flows: bool, gen: int = 0) -> None:
        b = layout.Backend()
        b.gen = gen & 0xFFFF
        b.addr[:] = layout.addr_words(addr)
        b.family = layout.family_of(addr)
        b.flags = layout.BE_F_FLOWS_STAY if keep_flows else 0
        b.vip_id = vip_id
        b.nexthop_id = nexthop_id
        self._write_backend(bid, bytes(b))

    def clear_backend(self, bid: int, gen: int = 0) -> None:
        """Release the entry (family AF_NONE, no flags: flows still pointing here are moved
        by the data path), keeping only its generation `gen`: the pinned map carries it
        across restarts, so the id's next user starts in a generation of its own."""
        b = layout.Backend()
        b.gen = gen & 0xFFFF
        self._write_backend(bid, bytes(b))

    def _write_backend(self, bid: int, entry: bytes) -> None:
        """The entry into every CPU's copy (each a single memcpy; the counters beside it
        are left alone)."""
        if not 0 < bid < self.limits.max_backends:
            raise ValueError(f"backend id {bid} out of range 1..{self.limits.max_backends - 1}")
        view, size = self._views["backends"], ctypes.sizeof(layout.BackendSlot)
        for cpu in range(self.ncpus):
            off = (cpu * self.limits.max_backends + bid) * size
            view[off:off + len(entry)] = entry

    def backend(self, bid: int) -> layout.Backend:
        """The entry of backend `bid` (CPU 0's copy; all copies are written alike)."""
        off = bid * ctypes.sizeof(layout.BackendSlot)
        return layout.Backend.unpack(
            self._views["backends"][off:off + ctypes.sizeof(layout.Backend)])

    def backend_entries(self) -> Iterator[tuple[int, BackendEntry]]:
        """(backend id, entry) of every backend in the map."""
        for bid in range(1, self.limits.max_backends):
            b = self.backend(bid)
            if b.family != layout.AF_NONE:
                yield bid, layout.backend_entry(b)

    def released_generations(self) -> Iterator[tuple[int, int]]:
        """(backend id, generation) of every released entry that keeps one (see
        clear_backend)."""
        for bid in range(1, self.limits.max_backends):
            b = self.backend(bid)
            if b.family == layout.AF_NONE and b.gen:
                yield bid, b.gen

    # --- rings ---------------------------------------------------------------------
    def install_rings(self, rings: list[tuple[int, array.array]], chunk: int = 256) -> None:
        """Swap each (ring_id, backend ids) in whole (see rings.install_rings)."""
        install_rings(self.maps["rings"], rings, self.ring_layout, chunk)

    def remove_ring(self, ring_id: int) -> None:
        self.maps["rings"].delete(_u32(ring_id))

    def read_ring(self, ring_id: int) -> Optional[array.array]:
        """The ring installed in rings[ring_id] (for tests and `explain`)."""
        return read_ring(self.maps["rings"], ring_id)

    # --- VIPs ----------------------------------------------------------------------
    def set_vip(self, addr: IPAddress, port: int, proto: int, vip_id: int, ring_id: int,
                ring_size: int, hash_src_only: bool = False, quic: bool = False) -> None:
        flags = ((layout.VIP_F_HASH_SRC_ONLY if hash_src_only else 0)
                 | (layout.VIP_F_QUIC if quic else 0))
        meta = layout.VipMeta(vip_id=vip_id, ring_size=ring_size, ring_id=ring_id, flags=flags)
        self.maps["vips"].update(layout.vip_key(addr, port, proto), meta)
        self.vip_index.set(bytes(layout.vip_key(addr, port, proto)), bytes(meta))

    def delete_vip(self, addr: IPAddress, port: int, proto: int) -> None:
        self.vip_index.delete(bytes(layout.vip_key(addr, port, proto)))
        self.maps["vips"].delete(layout.vip_key(addr, port, proto))

    def vip_entries(self) -> Iterator[tuple[tuple, VipEntry]]:
        """((address, port, proto), entry) of every VIP in the map."""
        for k, v in self.maps["vips"].items():
            yield layout.vip_ident(k), layout.vip_entry(v)

    def set_vip_addrs(self, addrs: Iterable[IPAddress], previous: Iterable[IPAddress] = ()
                      ) -> None:
        """Make `addrs` the set of VIP addresses: additions first (vip_addrs, then prefilter
        bits), removals last, clearing only bits no remaining address needs."""
        now, before = set(addrs), set(previous)
        pf = self.maps["prefilter"]
        for a in now - before:
            self.maps["vip_addrs"].update(layout.addr_key(a), _u32(1))
        words: dict[int, int] = {}
        for a in now:
            idx = prefilter_index(a)
            words[idx >> 6] = words.get(idx >> 6, 0) | (1 << (idx & 63))
        touched = {(prefilter_index(a) >> 6) for a in now | before}
        for w in sorted(touched):
            pf.update(_u32(w), ctypes.c_uint64(words.get(w, 0)))
        for a in before - now:
            self.maps["vip_addrs"].delete(layout.addr_key(a))

    # --- counters (lb/counterviews.py) ----------------------------------------------
    def global_counters(self) -> dict[str, int]:
        return global_counters(self.maps["stats"])

    def vip_counters(self, vip_id: int, bids: Iterable[int]
                     ) -> tuple[tuple[int, int], dict[int, tuple[int, int]]]:
        return self.counters.vip(vip_id, bids)

    def backend_counters(self, bid: int) -> tuple[int, int]:
        return self.counters.read("backend", bid)

    def retire_backend_counters(self, bid: int, vip_id: int) -> list[tuple[int, int]]:
        return self.counters.retire(bid, vip_id)

    def unretire_backend_counters(self, bid: int, vip_id: int,
                                  moved: list[tuple[int, int]]) -> None:
        self.counters.unretire(bid, vip_id, moved)

    def reset_counters(self, kind: str, idx: int) -> None:
        self.counters.reset(kind, idx)

    def flow_backend(self, fk: layout.FlowKey) -> Optional[int]:
        val = self.flows.lookup(fk)
        return None if val is None else val.backend_id
