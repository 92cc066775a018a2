"""Per-packet cost of the xdplb data path, relative to the cheapest forwarding program.

Method. BPF_PROG_TEST_RUN with `repeat` runs a program N times over one buffer and reports
the mean time per run; a program that rewrites its packet (encapsulation) would then see its
own output from the second run on. So every measurement runs bench.bpf.c's `bench_restore`,
which copies a template frame (map `bench_template`) over the buffer, restoring the data
pointer first, and tail-calls `bench_target`[0]: lb's `xdplb` for a case, or `bench_floor`
(MAC swap + XDP_TX) for the floor. Case and floor carry the same wrapper, and nothing is
subtracted: ratio = case ns / floor ns, the floor measured right before the case in the same
round. Rounds interleave floor and cases; the reported value is the median over rounds
(ns: median of the case's times; ratio: median of the per-round ratios).

Setup (as in the Katran comparison this is measured against): 100 backends per VIP,
Maglev ring of 65537 slots, IPIP (or GUE for gue_hit), one next hop, XDP_TX.

Proof of path: every run of every measurement is counted by lb's global counters (rx, tx,
pass, drop, flow_hit, flow_miss, ...) and by bench_stats (RUNS, FLOOR_TX); the deltas over
a case's measured runs are in its "verdicts", with "expect" naming the counters that must
equal "runs" and "ok" saying whether they do. tcp_syn varies the source port (vary) and the
low half of the source address (vary2) per run, and a per-round high half, so every run is a
new flow: a flow-table miss and insert. The flow table is sized so that (next to) nothing is
evicted: four slots per SYN flow of the run (a bucket overflows, and evicts, only when more
than 8 of its flows hash to it; flow_evicted in the verdicts counts it), and the oldest
measured SYN flow is looked up at the end to show it is still there.

The process pins itself to one CPU (default: the last one), so per-CPU counters are those
of that CPU and timings do not mix cores.

Reading the numbers. "primitives_ns" (bench.bpf.c's bench_ops) gives this machine's cost of
single operations: a helper call, a hash / LRU-hash lookup with lb's key sizes, an LRU
insert, an inner-map (ring) lookup, an adjust_head pair, a bpf_spin_lock pair, and a read
of a random line of a 64 MB table (what an uncached flow slot costs). The floor
makes no helper call at all (bench_restore adjusts the head only when the previous run
moved it), so each helper call and non-inlined map operation of a case counts fully against
its ratio. Encapsulating cases also pay one bpf_xdp_adjust_head in bench_restore (undoing
their own), which the floor does not: about half of adjust_head_pair.
"""

from __future__ import annotations

import array
import ctypes
import datetime
import ipaddress
import os
import platform
import random
import statistics
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from lb import layout, maglev, native
from lb.datapath import Datapath, EgressConfig, Limits
from lb.flowhash import prefilter_index
from lb.programmer import Programmer
from lb.specs import BackendSpec, QuicSpec, VipSpec, backend_key

from . import frames, publish
from .benchobj import B_FLOOR_TX, B_RUNS, BenchObject

# Ratio targets (printed, not asserted).
TARGETS = {"tcp_hit": 2.0, "tcp_syn": 6.0, "udp_hit": 2.6, "ipv6_hit": 2.6, "gue_hit": 3.8,
           "pass_v4": 1.2, "pass_v6": 1.2}
MAGLEV_BUILD_TARGET_MS = 2.0
# Targets relative to another case (ns / its ns, printed, not asserted): a QUIC packet
# routed by its connection ID should cost about what a UDP flow-table hit does.
VS_TARGETS = {"quic_short_cid": ("udp_hit", 1.10)}
QUIC_SERVER = 42  # the server ID quic_short_cid's connection ID carries

VIP4 = ipaddress.ip_address("10.0.0.10")
VIP6 = ipaddress.ip_address("fd00::10")
SRC_V4 = ipaddress.ip_address("10.9.0.1")
SRC_V6 = ipaddress.ip_address("fd09::1")
NEXTHOP_MAC = bytes.fromhex("02000000bb01")
SMAC = bytes.fromhex("02000000bb02")
FRAME_SIZE = 64      # IPv4 frames; IPv6 frames are 80 (40-byte header + 20 TCP + 6 payload)
FRAME_SIZE_V6 = 80

VERDICT_KEYS = ("rx", "tx", "redirect", "pass", "drop", "flow_hit", "flow_miss", "flow_moved",
                "drop_no_backend", "drop_malformed", "drop_too_big", "drop_no_nexthop",
                "drop_adjust_fail", "gue_zero_csum", "flow_insert_limited", "flow_cache_hit",
                "icmp_forwarded", "too_big_answered", "too_big_limited", "echo_answered",
                "flow_evicted", "flow_insert_raced", "quic_routed_by_cid", "quic_fallback")


@dataclass
class Case:
    name: str
    frame: bytes
    expect: tuple          # counters that must equal the number of runs
    encap: int = layout.ENCAP_IPIP
    prewarm: bool = False  # run once before measuring, so the flow is in the table
    syn: bool = False      # vary source port + low half of the source address per run
    zero: tuple = ()       # counters that must stay 0
    note: str = ""
    insert_limit: int = 0  # lb_config.flow_insert_limit during the case
    slack: int = 0         # `expect` counters may fall this short of runs (window edges)
    warm: bytes = b""      # a frame run once before measuring (an ICMP error's flow)
    mtu: int = 1500        # lb_config.mtu during the case


@dataclass
class Measured:
    ns: list = field(default_factory=list)
    ratios: list = field(default_factory=list)
    verdicts: dict = field(default_factory=dict)


def pick_cpu(cpu: Optional[int]) -> int:
    allowed = sorted(os.sched_getaffinity(0))
    if cpu is None:
        return allowed[-1]
    if cpu not in allowed:
        raise SystemExit(f"bench: CPU {cpu} not available (allowed: {allowed})")
    return cpu


def _non_vip(candidates: Sequence[str], vips: Sequence) -> ipaddress._BaseAddress:
    """A destination whose prefilter bit differs from every VIP's: the cheap pass path."""
    taken = {prefilter_index(v) for v in vips}
    for c in candidates:
        a = ipaddress.ip_address(c)
        if prefilter_index(a) not in taken:
            return a
    raise RuntimeError("no non-VIP address outside the prefilter")


def v4_backend(i: int) -> ipaddress.IPv4Address:
    return ipaddress.ip_address(f"10.1.{i // 250}.{i % 250 + 1}")


def v6_backend(i: int) -> ipaddress.IPv6Address:
    return ipaddress.ip_address(f"fd01::{i + 1:x}")


def quic_short(server_id: int) -> bytes:
    """A QUIC short-header payload of 22 bytes (a 64-byte IPv4 frame): first byte, an
    8-byte connection ID with a 2-byte server ID after its first octet, then 13 bytes."""
    return b"\x41" + b"\x2b" + server_id.to_bytes(2, "big") + b"\xa5" * 5 + b"\x17" * 13


def make_cases() -> list[Case]:
    pass4 = _non_vip(["10.0.0.99", "10.0.0.98", "10.0.0.97", "10.0.1.99"], [VIP4, VIP6])
    pass6 = _non_vip(["fd00::99", "fd00::98", "fd00::97", "fd00:1::99"], [VIP4, VIP6])
    fwd = ("rx", "tx")
    return [
        Case("tcp_hit", frames.frame(6, "192.168.1.1", 40001, str(VIP4), 80, FRAME_SIZE),
             fwd + ("flow_hit",), prewarm=True, zero=("flow_miss", "flow_moved")),
        Case("tcp_syn", frames.frame(6, "172.16.0.0", 1, str(VIP4), 80, FRAME_SIZE,
                                     frames.TCP_SYN),
             fwd + ("flow_miss",), syn=True,
             zero=("flow_hit", "flow_moved", "flow_insert_limited")),
        Case("tcp_syn_limited", frames.frame(6, "172.16.0.0", 1, str(VIP4), 80, FRAME_SIZE,
                                             frames.TCP_SYN),
             fwd + ("flow_miss", "flow_insert_limited"), syn=True, insert_limit=1, slack=16,
             zero=("flow_hit", "flow_moved"),
             note="over flow_insert_limit: forwarded by the ring, not inserted (what "
                  "Katran does beyond MAX_CONN_RATE)"),
        Case("udp_hit", frames.frame(17, "192.168.1.2", 40002, str(VIP4), 53, FRAME_SIZE),
             fwd + ("flow_hit",), prewarm=True, zero=("flow_miss", "flow_moved")),
        Case("quic_short_cid", frames.frame(17, "192.168.1.9", 40010, str(VIP4), 443,
                                            payload=quic_short(QUIC_SERVER)),
             fwd + ("quic_routed_by_cid",),
             zero=("flow_hit", "flow_miss", "flow_moved", "quic_fallback"),
             note="QUIC short header on a QUIC VIP, routed by the server ID in its "
                  "connection ID (before the connection table)"),
        Case("ipv6_hit", frames.frame(6, "fd02::1", 40003, str(VIP6), 80, FRAME_SIZE_V6),
             fwd + ("flow_hit",), prewarm=True, zero=("flow_miss", "flow_moved"),
             note="IP6IP6"),
        Case("gue_hit", frames.frame(6, "192.168.1.3", 40004, str(VIP4), 80, FRAME_SIZE),
             fwd + ("flow_hit",), encap=layout.ENCAP_GUE, prewarm=True,
             zero=("flow_miss", "flow_moved", "gue_zero_csum"), note="GUE over IPv4"),
        # ICMP: an error about a flow's reply, to the flow's backend (its entry found);
        # echo answered; a packet too big to encapsulate answered (its flow in the table).
        # Rare paths: they only have to stay out of the hit path's way.
        Case("icmp_error_v4",
             frames.icmp("192.168.9.1", str(VIP4), 3, 4, struct.pack("!HH", 0, 1400),
                         frames.frame(6, str(VIP4), 80, "192.168.1.5", 40007)[14:],
                         FRAME_SIZE + 24),
             fwd + ("icmp_forwarded",),
             warm=frames.frame(6, "192.168.1.5", 40007, str(VIP4), 80),
             zero=("flow_hit", "flow_miss", "drop"), note="frag needed quoting a reply"),
        Case("icmp_error_v6",
             frames.icmp("fd09::9", str(VIP6), 2, 0, struct.pack("!I", 1400),
                         frames.frame(6, str(VIP6), 80, "fd02::5", 40008, 80)[14:],
                         FRAME_SIZE_V6 + 48),
             fwd + ("icmp_forwarded",),
             warm=frames.frame(6, "fd02::5", 40008, str(VIP6), 80, 80),
             zero=("flow_hit", "flow_miss", "drop"), note="packet too big quoting a reply"),
        Case("echo_v4", frames.icmp("192.168.1.7", str(VIP4), 8, 0, struct.pack("!HH", 1, 1),
                                    b"", FRAME_SIZE),
             fwd + ("echo_answered",), zero=("drop", "pass")),
        Case("too_big_v4", frames.frame(6, "192.168.1.8", 40009, str(VIP4), 80, 256),
             fwd + ("flow_hit", "too_big_answered"), prewarm=True, mtu=200,
             zero=("flow_miss", "drop", "too_big_limited"),
             note="DF set, 242 bytes for an MTU of 180: frag needed from the VIP"),
        Case("pass_v4", frames.frame(6, "192.168.1.4", 40005, str(pass4), 80, FRAME_SIZE),
             ("rx", "pass"), zero=("tx", "drop")),
        Case("pass_v6", frames.frame(6, "fd02::2", 40006, str(pass6), 80, FRAME_SIZE_V6),
             ("rx", "pass"), zero=("tx", "drop")),
    ]


class CostBench:
    """lb's data path with the benchmark setup, and the bench skeleton around it."""

    def __init__(self, backends: int = 100, ring_size: int = 65537,
                 flow_table_size: int = 65536, vips: Optional[Sequence[VipSpec]] = None,
                 limits: Optional[Limits] = None):
        """vips/limits: another setup (next hop "nh") instead of the cases' three VIPs."""
        self.dp = Datapath(limits or Limits(flow_table_size=flow_table_size))
        self.bench = None
        try:
            # too-big answers unlimited: the too_big case measures answering, not the limit
            # if_mac: the frames' destination, so VIP packets pay the MAC check as in
            # the daemon
            self.egress = EgressConfig(smac=SMAC, source_v4=SRC_V4, source_v6=SRC_V6,
                                       gue_port=6080, mtu=1500, too_big_per_sec=0xFFFFFFFF,
                                       if_mac=frames.DST_MAC)
            self.dp.set_config(self.egress)
            if vips is None:
                b4 = tuple(BackendSpec(v4_backend(i), nexthop="nh") for i in range(backends))
                b6 = tuple(BackendSpec(v6_backend(i), nexthop="nh") for i in range(backends))
                bq = tuple(BackendSpec(v4_backend(i), nexthop="nh", server_id=i + 1)
                           for i in range(backends))
                vips = [VipSpec(VIP4, 80, 6, b4, ring_size=ring_size),
                        VipSpec(VIP4, 53, 17, b4, ring_size=ring_size),
                        VipSpec(VIP4, 443, 17, bq, ring_size=ring_size, quic=QuicSpec(2, 8)),
                        VipSpec(VIP6, 80, 6, b6, ring_size=ring_size)]
            self.programmer = Programmer(self.dp)
            self.programmer.apply(list(vips), macs={"nh": NEXTHOP_MAC})
            self.bench = BenchObject()
            self.target = self.bench.map("bench_target")
            self.restore_fd = self.bench.prog_fd("bench_restore")
            self.floor_fd = self.bench.prog_fd("bench_floor")
            self._encap = None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.bench is not None:
            self.bench.close()
        self.dp.close()

    def __enter__(self) -> "CostBench":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------
    def set_encap(self, encap: int, insert_limit: int = 0, mtu: int = 1500) -> None:
        if (encap, insert_limit, mtu) != self._encap:
            cfg = EgressConfig(**{**self.egress.__dict__, "encap": encap,
                                  "flow_insert_limit": insert_limit, "mtu": mtu})
            self.dp.set_config(cfg)
            self._encap = (encap, insert_limit, mtu)

    def set_template(self, frame: bytes, syn: bool = False, gen_cfg=None) -> None:
        """gen_cfg: a bench/traffic.py GenCfg, to vary flows per run as the live generator
        does (None: the template alone, syn varying as below)."""
        if len(frame) % 8 or len(frame) > frames.TMPL_MAX:
            raise ValueError(f"template of {len(frame)} bytes: multiple of 8, "
                             f"<= {frames.TMPL_MAX}")
        vary = vary2 = 0
        if syn:
            if frame[12:14] != b"\x08\x00":
                raise ValueError("vary2 is set up for IPv4 SYN templates only")
            vary, vary2 = frames.V4_L4, frames.V4_SADDR_LO
        self.bench.set_template(frame, vary, vary2)
        self.bench.set_gen_cfg(gen_cfg)

    def bench_counters(self) -> list[int]:
        """bench_stats per CPU: [(RUNS, FLOOR_TX) per CPU]."""
        return [self.bench.stat(B_RUNS), self.bench.stat(B_FLOOR_TX)]

    def counters(self) -> dict:
        g = self.dp.global_counters()
        runs, floor_tx = self.bench_counters()
        out = {k: g[k] for k in VERDICT_KEYS}
        out["runs"] = sum(runs)
        out["floor_tx"] = sum(floor_tx)
        return out

    def run(self, prog: str, frame: bytes, repeat: int) -> tuple[float, dict, int]:
        """One BPF_PROG_TEST_RUN of bench_restore -> prog ('lb' or 'floor') with `repeat`
        runs: (ns per run, counter deltas, last retval). The template must be set."""
        fd = self.dp.prog_fd if prog == "lb" else self.floor_fd
        self.target.update_fd(ctypes.c_uint32(0), fd)
        before = self.counters()
        r = native.test_run(self.restore_fd, frame, repeat=repeat)
        after = self.counters()
        delta = {k: after[k] - before[k] for k in after}
        return float(r.duration_ns), delta, r.retval


def _add(acc: dict, d: dict) -> None:
    for k, v in d.items():
        acc[k] = acc.get(k, 0) + v


def _check(name: str, v: dict, expect: Sequence[str], zero: Sequence[str],
           slack: int = 0) -> bool:
    runs = v.get("runs", 0)
    return runs > 0 and all(runs - slack <= v.get(k, -1) <= runs for k in expect) and \
        all(v.get(k, 0) == 0 for k in zero)


def _syn_round(frame: bytes, rnd: int) -> bytes:
    """The SYN template of round `rnd` (-1: warm-up): its own /16 of source addresses, so
    flows never repeat even if the per-CPU run counter did."""
    b = bytearray(frame)
    b[frames.V4_SADDR + 1] = (17 + rnd) & 0xFF
    return bytes(b)


def syn_flow_key(frame: bytes, run: int) -> layout.FlowKey:
    f = frames.vary(frame, run, frames.V4_L4, frames.V4_SADDR_LO)
    return layout.flow_key(*frames.parse_tuple(f))


OPS = {"helper_call": 1, "hash20_lookup": 2, "lru40_lookup": 3, "array_lookup": 4,
       "adjust_head_pair": 5, "lru40_insert": 6, "ring_lookup": 7, "lru40_rewrite": 8,
       "hash20_insert": 9, "spin_lock_pair": 10, "random_read_64mb": 11}
INSERTS = ("lru40_insert", "hash20_insert")
OPS_COUNT = 32


BIG_LINES = 1 << 20  # 64-byte lines: 64 MB, a 1M-slot connection table


def _fill_cycle(m: native.Map, n: int, seed: int = 1) -> None:
    """Lines 0..n-1 of `m` as one random cycle (line i names the next): a walk from any
    line visits every line before it comes back."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    nxt = array.array("I", bytes(4 * n))
    for a, b in zip(order, order[1:] + order[:1]):
        nxt[a] = b
    vals = bytearray(64 * n)
    vals[0::64], vals[1::64], vals[2::64], vals[3::64] = (
        nxt.tobytes()[i::4] for i in range(4))  # little-endian u32 at offset 0
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        m.update_batch(array.array("I", range(lo, hi)).tobytes(),
                       bytes(vals[64 * lo:64 * hi]), hi - lo)


def calibrate(repeat: int = 100_000, rounds: int = 5, insert_repeat: int = 2_000) -> dict:
    """Cost in ns of single primitives on this machine, from bench.bpf.c's bench_ops:
    (t(32 ops) - t(0 ops)) / 32, median over rounds. Keys and map types as lb uses them:
    hash20 = `vips` (hash, 20-byte key), lru40 = `flows` (per-CPU-list LRU hash, 40-byte
    key; lookups hit, inserts are new keys into a table far from full), ring = `rings`
    (array of maps; the inner lookup goes through the helper), adjust_head_pair = two
    bpf_xdp_adjust_head calls, random_read_64mb = a read of a random 64-byte line in a
    64 MB array (the size of a 1M-slot `flows`) that waits for the read before it: what
    a packet pays to reach its flow's slot when the slot is not cached. Helps to read
    the case costs: which calls they pay, and what memory costs on this machine."""
    ins_total = insert_repeat * OPS_COUNT * (rounds + 1)
    sk = native.Skeleton("bench")
    try:
        sk.set_max_entries("bench_lru40", max(65536, 2 * native.num_cpus() * ins_total))
        sk.set_max_entries("bench_h20", max(1024, 2 * ins_total))
        sk.set_max_entries("bench_big", BIG_LINES)
        sk.load()
        _fill_cycle(sk.map("bench_big"), BIG_LINES)
        cfg, fd = sk.map("bench_ops_cfg"), sk.prog_fd("bench_ops")
        h20, l40 = sk.map("bench_h20"), sk.map("bench_lru40")
        for i in range(64):
            h20.update(struct.pack("=5I", i, 0, 0, 0, 0), struct.pack("=Q", i))
            l40.update(struct.pack("=10I", i, 0, 0, 0, 0, 0, 0, 0, 0, 0), struct.pack("=Q", i))
        inner = native.create_map(native.BPF_MAP_TYPE_ARRAY, "bench_ring", 4, 4, 65537,
                                  map_flags=native.lib.BPF_F_INNER_MAP)
        with inner:
            sk.map("bench_rings").update_fd(ctypes.c_uint32(0), inner.fd)
        frame = bytes(64)

        def t(op: int, count: int, n: int) -> float:
            cfg.update(ctypes.c_uint32(0), struct.pack("=II", op, count))
            return float(native.test_run(fd, frame, repeat=n).duration_ns)

        out = {}
        for name, op in OPS.items():
            n = insert_repeat if name in INSERTS else repeat
            t(op, OPS_COUNT, min(n, 1000))  # warm
            per = []
            for _ in range(rounds):
                base = t(0, 0, n)
                per.append((t(op, OPS_COUNT, n) - base) / OPS_COUNT)
            out[name] = round(statistics.median(per), 2)
        return out
    finally:
        sk.close()


def maglev_build_ms(n: int = 1000, m: int = 65537, builds: int = 9) -> float:
    """Median wall time of lb.maglev.build for n equal-weight IPv4 backends keyed like
    lb.specs.backend_key."""
    addrs = sorted((v4_backend(i) for i in range(n)), key=backend_key)
    holders = [maglev.Slotholder(backend_key(a), 1) for a in addrs]
    ids = list(range(1, n + 1))
    maglev.build(holders, m, ids)  # warm
    times = []
    for _ in range(builds):
        t0 = time.perf_counter()
        maglev.build(holders, m, ids)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine_info(cpu: Optional[int] = None) -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"kernel": platform.release(), "cpu_model": model or platform.processor(),
            "cores": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version()}
    if cpu is not None:
        info["pinned_cpu"] = cpu
    return info


def run_cost(out: Optional[str] = None, repeat: int = 500_000, syn_repeat: int = 100_000,
             rounds: int = 7, cpu: Optional[int] = None, backends: int = 100,
             ring_size: int = 65537, maglev_builds: int = 9, cases: Optional[Sequence[str]] = None,
             quiet: bool = False, calib_repeat: int = 100_000) -> dict:
    """Measure every case; write cost.json into `out` (default bench/results); return it.
    calib_repeat: runs per measurement of the primitive costs (0: skip them)."""
    cpu = pick_cpu(cpu)
    old_aff = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return _run_cost(out, repeat, syn_repeat, rounds, cpu, backends, ring_size,
                         maglev_builds, cases, quiet, calib_repeat)
    finally:
        os.sched_setaffinity(0, old_aff)


def _run_cost(out, repeat, syn_repeat, rounds, cpu, backends, ring_size, maglev_builds,
              only, quiet, calib_repeat) -> dict:
    all_cases = make_cases()
    todo = [c for c in all_cases if not only or c.name in only]
    unknown = set(only or ()) - {c.name for c in all_cases}
    if unknown:
        raise SystemExit(f"bench: unknown case(s) {sorted(unknown)}; "
                         f"known: {[c.name for c in all_cases]}")
    warm_n = min(repeat, 10_000)
    syn_flows = (syn_repeat * rounds + min(syn_repeat, 10_000)) \
        if any(c.syn for c in todo) else 0
    # one table for all CPUs; four slots per flow keeps its buckets from overflowing
    ncpu = native.num_cpus()
    table = max(65536, 4 * (syn_flows + 1024))

    res: dict[str, Measured] = {c.name: Measured() for c in todo}
    floors: list[float] = []
    floor_v: dict = {}
    oldest_syn = None
    with CostBench(backends, ring_size, table) as cb:
        # warm-up: JIT images, caches, and the flows the hit cases need
        for c in todo:
            cb.set_encap(c.encap, c.insert_limit, c.mtu)
            if c.warm:
                cb.set_template(c.warm)
                cb.run("lb", c.warm, 1)
            cb.set_template(_syn_round(c.frame, -1) if c.syn else c.frame, c.syn)
            if c.prewarm:
                cb.run("lb", c.frame, 1)
            cb.run("lb", c.frame, min(syn_repeat, warm_n) if c.syn else warm_n)
        cb.set_template(todo[0].frame)
        cb.run("floor", todo[0].frame, warm_n)

        for rnd in range(rounds):
            for c in todo:
                n = syn_repeat if c.syn else repeat
                cb.set_encap(c.encap, c.insert_limit, c.mtu)
                frame = _syn_round(c.frame, rnd) if c.syn else c.frame
                # floor with the same template (same copy cost), right before the case
                cb.set_template(frame, c.syn)
                fns, fd, _ = cb.run("floor", frame, n)
                floors.append(fns)
                _add(floor_v, fd)
                # the flow the first measured SYN that is remembered makes (one over
                # flow_insert_limit is, by design, not)
                if c.syn and not c.insert_limit and oldest_syn is None:
                    oldest_syn = syn_flow_key(frame, cb.bench_counters()[0][cpu] + 1)
                ns, d, _ = cb.run("lb", frame, n)
                m = res[c.name]
                m.ns.append(ns)
                m.ratios.append(ns / fns if fns else float("nan"))
                _add(m.verdicts, d)
        syn_kept = None
        if oldest_syn is not None:
            syn_kept = cb.dp.flow_backend(oldest_syn) is not None
        flow_table = table

    build_ms = maglev_build_ms(1000, 65537, maglev_builds)
    calib = calibrate(calib_repeat, min(rounds, 5), max(calib_repeat // 50, 10)) \
        if calib_repeat > 0 else None
    result: dict = {"floor_ns": round(statistics.median(floors), 2), "cases": {},
                    "maglev_build_ms": round(build_ms, 3)}
    for c in todo:
        m = res[c.name]
        v = dict(m.verdicts)
        v["aborted_or_other"] = v["runs"] - v["tx"] - v["pass"] - v["drop"] - v["redirect"]
        entry = {"ns": round(statistics.median(m.ns), 2),
                 "ratio": round(statistics.median(m.ratios), 3),
                 "verdicts": v,
                 "expect": list(c.expect),
                 "ok": _check(c.name, v, c.expect, c.zero, c.slack * len(m.ns)),
                 "target_ratio": TARGETS.get(c.name),
                 "ns_all": [round(x, 1) for x in m.ns],
                 "ratio_all": [round(x, 3) for x in m.ratios]}
        if c.note:
            entry["note"] = c.note
        if c.syn and not c.insert_limit:
            entry["oldest_flow_kept"] = syn_kept
            entry["ok"] = entry["ok"] and syn_kept is not False
        tgt = TARGETS.get(c.name)
        entry["meets_target"] = tgt is not None and entry["ratio"] <= tgt
        if c.name in VS_TARGETS and VS_TARGETS[c.name][0] in res:
            other, vs_tgt = VS_TARGETS[c.name]
            vs = statistics.median(a / b for a, b in zip(m.ns, res[other].ns))
            entry["vs"] = {"case": other, "ratio": round(vs, 3), "target": vs_tgt,
                           "meets_target": vs <= vs_tgt}
        result["cases"][c.name] = entry
    fv = dict(floor_v)
    result["floor"] = {"ns_all": [round(x, 1) for x in floors], "verdicts": fv,
                       "ok": fv.get("floor_tx") == fv.get("runs") and fv.get("rx", 0) == 0}
    result["maglev_build_target_ms"] = MAGLEV_BUILD_TARGET_MS
    result["params"] = {"repeat": repeat, "syn_repeat": syn_repeat, "rounds": rounds,
                        "backends_per_vip": backends, "ring_size": ring_size,
                        "flow_table_size": flow_table,
                        "syn_flows_per_slot": round(syn_flows / flow_table, 3),
                        "frame_bytes_v4": FRAME_SIZE,
                        "frame_bytes_v6": FRAME_SIZE_V6, "maglev_build": "M=65537, N=1000"}
    result["machine"] = machine_info(cpu)
    if calib is not None:
        result["primitives_ns"] = calib

    publish(result, out, "cost", show=None if quiet else print_cost)
    return result


def print_cost(r: dict, path: Path | str = "") -> None:
    print(f"per-packet cost (BPF_PROG_TEST_RUN, median of {r['params']['rounds']} rounds, "
          f"CPU {r['machine'].get('pinned_cpu')}); floor {r['floor_ns']:.1f} ns")
    print(f"{'case':10} {'ns':>8} {'ratio':>7} {'target':>7}  {'':6} verdicts")
    for name, c in r["cases"].items():
        t = c["target_ratio"]
        mark = "ok" if c["meets_target"] else f"+{(c['ratio'] / t - 1) * 100:.0f}%" if t else ""
        v = c["verdicts"]
        vs = " ".join(f"{k}={v[k]}" for k in ("runs",) + tuple(c["expect"]) if k in v)
        vs += "" if c["ok"] else "  PATH CHECK FAILED"
        print(f"{name:10} {c['ns']:8.1f} {c['ratio']:7.2f} {t if t else '':>7}  {mark:6} {vs}")
    for name, c in r["cases"].items():
        if c.get("vs"):
            vs = c["vs"]
            print(f"{name} / {vs['case']}: {vs['ratio']:.3f} (target <= {vs['target']}) "
                  f"{'ok' if vs['meets_target'] else 'missed'}")
    ms, t = r["maglev_build_ms"], r["maglev_build_target_ms"]
    print(f"maglev build M=65537 N=1000: {ms:.2f} ms (target <= {t}) "
          f"{'ok' if ms <= t else f'+{(ms / t - 1) * 100:.0f}%'}")
    if r.get("primitives_ns"):
        print("primitives (ns each): " + ", ".join(f"{k} {v:.1f}"
                                                  for k, v in r["primitives_ns"].items()))
    if path:
        print(f"-> {path}")
