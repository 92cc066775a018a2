"""Packet-rate runs through xdplb on real interfaces: offered / forwarded Mpps, loss and
Mpps per core, each next to the floor measured in the same run.

Generators (one runner, same counters and output for both):

* kernel pktgen (/proc/net/pktgen) when the kernel has it (edge nodes): UDP only, the
  classic knobs count, size, flows, threads, rate (KernelPktgen).
* live frames otherwise: bench.bpf.c's `bench_gen` run by BPF_PROG_TEST_RUN with
  BPF_F_TEST_XDP_LIVE_FRAMES, so each run is a frame really transmitted (XDP_TX) out of
  the generator's veth into the LB's. Live-frame pages are recycled without restoring
  their contents and the LB rewrites what it receives, so bench_gen writes the whole
  template into every frame and varies the flow fields itself (map `bench_gen_cfg`),
  keeping IPv4 header and TCP/UDP checksums valid (the kernel stack, on the iptables
  path, checks them).

Topology (PktLab), three namespaces with unique names, removed afterwards:

    gen ns              LB ns                                  sink ns
    [g0] <--- veth ---> [l0]  program under test (native XDP)
    bench_sink          [l1] <------------- veth --------------> [s0] bench_sink

    XDP_TX from l0 goes back to g0 (bench_sink counts it); XDP_REDIRECT and the kernel
    stack's forwarding go out l1 to s0. IPv6 is disabled on the interfaces (no stray
    neighbour discovery frames in the sink counts; XDP still forwards IPv6 traffic).

One core. The generator thread is pinned to one CPU, and everything downstream runs there
too: bench_gen's XDP_TX flush schedules l0's NAPI on the local CPU, which runs the program
under test in softirq right after each batch, and its XDP_TX schedules g0's (the sink).
So a run's Mpps is what one core does for generator + data path + sink; the floor
(bench_floor: MAC swap + XDP_TX, the cheapest forwarding program) carries the same
generator and sink, so "ratio" = case Mpps / floor Mpps, and "ns_over_floor" = the data
path's own extra cost per packet on that core. With threads=N, N generator threads on N
CPUs (veths with one queue per CPU).

Two clocks. offered / forwarded Mpps are over wall time (all threads together). Mpps per
core ("per_core_mpps", which ratios use) is over busy time: the kernel's own duration of
each BPF_PROG_TEST_RUN, which includes the softirq work the run triggers on its CPU (data
path, sink) and excludes the time the thread was preempted, so other work sharing the
machine moves wall-clock rates much more than per-core ones. Softirq work deferred to
ksoftirqd would escape busy time; its run time during each measurement is recorded
("ksoftirqd_s") to show it stays small.

Proof of path: every measurement records the deltas of bench_stats (GEN, FLOOR_TX,
SINK_PKTS, SINK_BYTES) and of xdplb's global counters; "ok" says every packet xdplb
received took the path the case names (e.g. hit: rx == tx == flow_hit), "loss" compares
what the sink counted with what was generated (0 on every run here).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import math
import os
import statistics
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from lb import layout as L
from lb import native
from lb import netns as N
from lb.datapath import Datapath, EgressConfig, Limits
from lb.flowhash import prefilter_index
from lb.native import ffi, lib
from lb.programmer import Programmer
from lb.specs import BackendSpec, VipSpec

from . import frames as F
from . import results_dir
from .cost import machine_info

# bench_stats indexes (bench.bpf.c)
B_RUNS, B_FLOOR_TX, B_SINK_PKTS, B_SINK_BYTES, B_GEN = range(5)
GEN_FIELDS = 4
TEST_XDP_MAX_BATCH = 256

# lab addressing
MAC = {"g0": bytes.fromhex("027800000001"), "l0": bytes.fromhex("027800000002"),
       "l1": bytes.fromhex("027800000003"), "s0": bytes.fromhex("027800000004")}
NET = {"g0": "10.30.0.2/24", "l0": "10.30.0.1/24", "l1": "10.31.0.1/24", "s0": "10.31.0.2/24"}
SINK_GW = "10.31.0.2"
BACKEND_NET4 = "10.244.0.0/16"   # backends (iptables DNAT targets) routed to the sink side
BACKEND_NET6 = "fd44::/64"
OTHER_NET = "10.33.0.0/16"       # non-VIP destinations, routed by the LB's stack to the sink
VIP4 = ipaddress.ip_address("10.96.0.10")
VIP6 = ipaddress.ip_address("fd00:96::10")
SRC4 = ipaddress.ip_address("172.16.0.1")
SRC6 = ipaddress.ip_address("fd16::1")
VIP_PORT = 80
SOURCE4 = ipaddress.ip_address("10.31.0.1")
SOURCE6 = ipaddress.ip_address("fd31::1")
GUE_PORT = 6080

# frame field offsets (Ethernet + IPv4 / IPv6)
V4 = {"ip_csum": 24, "saddr_hi": 26, "saddr_lo": 28, "daddr_hi": 30, "daddr_lo": 32, "l4": 34}
V6 = {"saddr_hi": 34, "saddr_lo": 36, "daddr_lo": 52, "l4": 54}
SPORT_BASE, SPORT_SPAN = 1024, 64512


# --- bench_gen configuration (mirror of struct bench_gen_cfg in bench.bpf.c) -----------
class GenField(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint16), ("in_ip", ctypes.c_uint8),
                ("in_l4", ctypes.c_uint8), ("div", ctypes.c_uint32),
                ("mod", ctypes.c_uint32), ("base", ctypes.c_uint32),
                ("cpu_step", ctypes.c_uint32)]


class GenCfg(ctypes.Structure):
    _fields_ = [("frame_len", ctypes.c_uint32), ("ip_csum_off", ctypes.c_uint16),
                ("l4_csum_off", ctypes.c_uint16), ("l4_udp", ctypes.c_uint8),
                ("nfields", ctypes.c_uint8), ("pad", ctypes.c_uint16),
                ("f", GenField * GEN_FIELDS)]


def build_frame(proto: int, src, sport: int, dst, dport: int, size: int = 64,
                flags: int = F.TCP_ACK, smac: bytes = F.SRC_MAC,
                dmac: bytes = F.DST_MAC) -> bytes:
    """An Ethernet frame of exactly `size` bytes (any size from the headers up), IP
    lengths matching the frame, checksums valid."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError("source and destination of one family")
    l3 = 20 if s.version == 4 else 40
    l4 = 20 if proto == 6 else 8
    plen = size - F.ETH_HLEN - l3 - l4
    if plen < 0:
        raise ValueError(f"frame size {size} too small for the headers "
                         f"({F.ETH_HLEN + l3 + l4})")
    seg = F._l4(proto, sport, dport, b"x" * plen, flags)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, proto, len(seg))
        seg = F._with_l4_csum(proto, seg, pseudo)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 0, 0x4000, 64, proto, 0,
                         s.packed, d.packed)
        ip = ip[:10] + struct.pack("!H", F._csum(ip)) + ip[12:]
        etype = 0x0800
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(seg), proto)
        seg = F._with_l4_csum(proto, seg, pseudo)
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(seg), proto, 64, s.packed, d.packed)
        etype = 0x86DD
    out = dmac + smac + struct.pack("!H", etype) + ip + seg
    assert len(out) == size
    return out


@dataclass(frozen=True)
class Traffic:
    """What the generator sends. flows > 0: that many flows (5-tuples), cycled, so after
    one pass every packet belongs to a known flow; flows == 0: every packet a new flow
    (TCP SYN by default). vips > 1 spreads packets over that many consecutive destination
    addresses starting at dst (the low 16 bits vary)."""

    name: str
    dst: ipaddress._BaseAddress = VIP4
    src: ipaddress._BaseAddress = SRC4
    dport: int = VIP_PORT
    proto: int = 6
    size: int = 64
    flows: int = 1024
    vips: int = 1

    @property
    def family(self) -> int:
        return self.dst.version

    @property
    def new_flows(self) -> bool:
        return self.flows == 0

    def frame(self, smac: bytes, dmac: bytes) -> bytes:
        flags = F.TCP_SYN if self.new_flows else F.TCP_ACK
        return build_frame(self.proto, self.src, SPORT_BASE, self.dst, self.dport,
                           self.size, flags, smac, dmac)

    def distinct_flows(self) -> int:
        """Flows the generator cycles through (0: unbounded)."""
        if self.new_flows:
            return 0
        per = -(-self.flows // self.vips)
        sport = min(per, SPORT_SPAN)
        return self.vips * sport * -(-per // SPORT_SPAN)

    def gen_cfg(self) -> GenCfg:
        off = V4 if self.family == 4 else V6
        v4 = self.family == 4
        l4 = off["l4"]
        c = GenCfg()
        c.frame_len = self.size
        c.ip_csum_off = off["ip_csum"] if v4 else 0
        c.l4_csum_off = l4 + (16 if self.proto == 6 else 6)
        c.l4_udp = 1 if self.proto == 17 else 0
        fields: list[tuple] = []  # (off, in_ip, div, mod, base, cpu_step)
        src_lo = int(self.src) & 0xFFFF
        dst_lo = int(self.dst) & 0xFFFF
        if self.vips > 1:
            if dst_lo + self.vips > 0x10000:
                raise ValueError(f"{self.vips} destinations from {self.dst} cross a /16")
            fields.append((off["daddr_lo"], v4, 1, self.vips, dst_lo, 0))
        if self.new_flows:
            # (source, port) from the run counter alone: unique per run whatever the
            # destinations, so no two patterns ever send the same new flow
            fields.append((l4, 0, 1, SPORT_SPAN, SPORT_BASE, 0))
            fields.append((off["saddr_lo"], v4, SPORT_SPAN, 0x10000, 0, 0))
            # a source /16 per CPU: threads never send the same flow
            fields.append((off["saddr_hi"], v4, 1, 1, (int(self.src) >> 16) & 0xFFFF, 1))
        else:
            per = -(-self.flows // self.vips)
            fields.append((l4, 0, self.vips, min(per, SPORT_SPAN), SPORT_BASE, 0))
            if per > SPORT_SPAN:
                fields.append((off["saddr_lo"], v4, self.vips * SPORT_SPAN,
                               -(-per // SPORT_SPAN), src_lo, 0))
        if len(fields) > GEN_FIELDS:
            raise ValueError("too many varied fields")
        for i, (o, in_ip, div, mod, base, step) in enumerate(fields):
            if div >= 1 << 32:
                raise ValueError("too many destinations for the flow counter")
            c.f[i] = GenField(o, 1 if in_ip else 0, 1, div, mod, base, step)
        c.nfields = len(fields)
        return c


def expected_frame(frame: bytes, cfg: GenCfg, run: int, cpu: int = 0) -> bytes:
    """What bench_gen makes of `frame` on the run whose counter value is `run` (Python
    mirror, for tests): the fields written, then checksums recomputed from scratch."""
    b = bytearray(frame[: cfg.frame_len])
    for i in range(cfg.nfields):
        f = cfg.f[i]
        v = (f.base + (run // max(f.div, 1)) % max(f.mod, 1) + cpu * f.cpu_step) & 0xFFFF
        struct.pack_into("!H", b, f.off, v)
    etype = struct.unpack_from("!H", b, 12)[0]
    if etype == 0x0800:
        struct.pack_into("!H", b, 24, 0)
        struct.pack_into("!H", b, 24, F._csum(bytes(b[14:34])))
        proto, src, dst, l4 = b[23], bytes(b[26:30]), bytes(b[30:34]), 34
        seg_len = struct.unpack_from("!H", b, 16)[0] - 20
        pseudo = src + dst + struct.pack("!BBH", 0, proto, seg_len)
    else:
        proto, src, dst, l4 = b[20], bytes(b[22:38]), bytes(b[38:54]), 54
        seg_len = struct.unpack_from("!H", b, 18)[0]
        pseudo = src + dst + struct.pack("!IxxxB", seg_len, proto)
    coff = l4 + (16 if proto == 6 else 6)
    struct.pack_into("!H", b, coff, 0)
    seg = F._with_l4_csum(proto, bytes(b[l4:l4 + seg_len]), pseudo)
    b[l4:l4 + seg_len] = seg
    return bytes(b)


def live_run(prog_fd: int, frame: bytes, count: int, ifindex: int,
             batch: int = 64) -> int:
    """BPF_PROG_TEST_RUN with live frames: `count` frames through prog_fd, XDP_TX ones
    transmitted out of `ifindex` (resolved in the calling thread's netns). Returns the
    kernel's ns per frame. (xdp_md.data_end must equal the frame length, which
    lb.native.test_run leaves at 0: the kernel answers EINVAL.)"""
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    din = ffi.new("char[]", frame)
    opts.data_in = din
    opts.data_size_in = len(frame)
    ctx = ffi.new("__u32[6]")  # struct xdp_md
    ctx[1] = len(frame)        # data_end
    ctx[3] = ifindex           # ingress_ifindex
    opts.ctx_in = ctx
    opts.ctx_size_in = 24
    opts.repeat = count
    opts.flags = lib.BPF_F_TEST_XDP_LIVE_FRAMES
    opts.batch_size = min(batch, TEST_XDP_MAX_BATCH)
    ret = lib.bpf_prog_test_run_opts(prog_fd, opts)
    if ret < 0:
        raise native.BpfError("running BPF_PROG_TEST_RUN with live frames", -ret)
    return opts.duration


def _ip(argv: Sequence[str]) -> None:
    r = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise N.NetnsError(5, f"ip {' '.join(argv)}: {r.stderr.strip()}")


class PktLab:
    """gen ns [g0] <-> [l0 LB ns l1] <-> [s0] sink ns, and bench.bpf.c loaded once
    (generator, floor, sinks and their counters). Use as a context manager."""

    def __init__(self, prefix: str = "xp", queues: Optional[int] = None):
        self.prefix = prefix
        self.queues = queues or os.cpu_count() or 1
        self.ns: dict[str, N.Netns] = {}
        self.bench: Optional[native.Skeleton] = None
        self.on_l0: Optional[str] = None

    # --- lifetime ----------------------------------------------------------------
    def up(self) -> "PktLab":
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        for role in ("g", "l", "s"):
            ns = N.Netns(N.unique_name(f"{self.prefix}{role}"))
            self.ns[role] = ns
            for k in ("all", "default"):
                ns.sysctl(f"net.ipv6.conf.{k}.disable_ipv6", 1)
        g, lb, s = self.ns["g"], self.ns["l"], self.ns["s"]
        q = str(self.queues)
        for a, na, b, nb in (("g0", g, "l0", lb), ("l1", lb, "s0", s)):
            _ip(["-n", na.name, "link", "add", a, "address", N._mac_str(MAC[a]),
                 "numtxqueues", q, "numrxqueues", q, "type", "veth", "peer", "name", b,
                 "netns", nb.name, "address", N._mac_str(MAC[b]), "numtxqueues", q,
                 "numrxqueues", q])
        for name, ns in (("g0", g), ("l0", lb), ("l1", lb), ("s0", s)):
            ns.add_address(name, NET[name])
            ns.set_link(name, up=True)
        lb.router()
        lb.add_neighbor("l1", SINK_GW, MAC["s0"])
        lb.add_neighbor("l0", NET["g0"].split("/")[0], MAC["g0"])
        for net in (BACKEND_NET4, OTHER_NET):
            lb.add_route(net, via=SINK_GW)
        self.bench = native.Skeleton("bench")
        self.bench.load()
        self.stats = self.bench.map("bench_stats")
        self.template = self.bench.map("bench_template")
        self.cfg = self.bench.map("bench_gen_cfg")
        self.gen_fd = self.bench.prog_fd("bench_gen")
        g.xdp_attach("g0", self.bench.prog_fd("bench_sink"), "native")
        s.xdp_attach("s0", self.bench.prog_fd("bench_sink"), "native")
        self.g0_index = g.ifindex("g0")
        self.l1_index = lb.ifindex("l1")

    def down(self) -> None:
        for ns in reversed(list(self.ns.values())):
            with contextlib.suppress(Exception):
                ns.remove()
        self.ns.clear()
        if self.bench is not None:
            self.bench.close()
            self.bench = None

    def __enter__(self) -> "PktLab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def lb(self) -> N.Netns:
        return self.ns["l"]

    # --- programs ------------------------------------------------------------------
    def set_l0(self, name: str, fd: int) -> None:
        """Attach (or replace with) program `fd` natively on l0; `name` labels it.
        Always attaches: an fd number may have been reused by another program since."""
        self.lb.xdp_attach("l0", fd, "native")
        self.on_l0 = name

    def prog(self, name: str) -> int:
        return self.bench.prog_fd(name)

    # --- generator -------------------------------------------------------------------
    def set_traffic(self, t: Traffic) -> bytes:
        frame = t.frame(MAC["g0"], MAC["l0"])
        tl = min(len(frame) // 8 * 8, F.TMPL_MAX)
        hdr = F.ETH_HLEN + (20 if t.family == 4 else 40) + (20 if t.proto == 6 else 8)
        if tl < hdr:
            raise ValueError(f"frame of {len(frame)} bytes: headers do not fit the template")
        tmpl = L.BenchTemplate()
        tmpl.len = tl
        tmpl.data[:tl] = frame[:tl]
        self.template.update(ctypes.c_uint32(0), tmpl)
        self.cfg.update(ctypes.c_uint32(0), t.gen_cfg())
        return frame

    def bench_counts(self) -> dict:
        out = {}
        for name, idx in (("gen", B_GEN), ("floor_tx", B_FLOOR_TX), ("sink", B_SINK_PKTS),
                          ("sink_bytes", B_SINK_BYTES)):
            out[name] = sum(struct.unpack("=Q", v[:8])[0]
                            for v in self.stats.lookup_percpu(ctypes.c_uint32(idx)))
        return out

    def generate(self, frame: bytes, count: int, cpus: Sequence[int], batch: int = 64,
                 rate: float = 0.0) -> tuple[float, float]:
        """Send `count` frames from each CPU in `cpus` (one thread per CPU, concurrently);
        rate > 0 paces each thread to rate/len(cpus) frames per second, in bursts of
        100 ms. Returns (wall seconds from first start to last end, busy seconds summed
        over threads). Wall time includes each BPF_PROG_TEST_RUN call's set-up and
        tear-down (~25 ms here, an RCU grace period), so wall-clock rates read a few
        percent low at 0.5 s per measurement. Busy
        time is the kernel's own measure of each BPF_PROG_TEST_RUN (duration x frames):
        it covers the softirq work the run triggers on its CPU (the data path, the sink)
        and leaves out the time the thread was preempted, so it holds up on a machine
        where other work shares the CPU."""
        errors: list[BaseException] = []
        spans: list[tuple[float, float]] = []
        busy: list[float] = []
        per_rate = rate / len(cpus) if rate else 0.0

        def worker(cpu: int) -> None:
            try:
                os.sched_setaffinity(0, {cpu})  # this thread only
                with self.ns["g"].entered():
                    t0 = time.perf_counter()
                    ns = 0
                    if not per_rate:
                        ns = live_run(self.gen_fd, frame, count, self.g0_index, batch) * count
                    else:
                        # each call costs ~25 ms of set-up and tear-down here (an RCU
                        # grace period): pace in 100 ms bursts
                        chunk = max(batch, int(per_rate / 10))
                        sent = 0
                        while sent < count:
                            n = min(chunk, count - sent)
                            ns += live_run(self.gen_fd, frame, n, self.g0_index, batch) * n
                            sent += n
                            ahead = t0 + sent / per_rate - time.perf_counter()
                            if ahead > 0:
                                time.sleep(ahead)
                    spans.append((t0, time.perf_counter()))
                    busy.append(ns / 1e9)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        if len(cpus) == 1:  # no thread: keeps the caller's affinity tidy
            old = os.sched_getaffinity(0)
            try:
                worker(cpus[0])
            finally:
                os.sched_setaffinity(0, old)
        else:
            threads = [threading.Thread(target=worker, args=(c,)) for c in cpus]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return max(e for _, e in spans) - min(s for s, _ in spans), sum(busy)

    def settle(self, key: str = "sink", timeout: float = 0.5) -> dict:
        """Counters once `key` stops moving (frames still in rings land within ms)."""
        last = self.bench_counts()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.01)
            now = self.bench_counts()
            if now[key] == last[key]:
                return now
            last = now
        return last


# --- measurements ---------------------------------------------------------------------
LB_KEYS = ("rx", "tx", "redirect", "pass", "drop", "flow_hit", "flow_miss", "flow_moved",
           "drop_no_backend", "drop_no_nexthop", "drop_too_big", "drop_adjust_fail")


@dataclass
class Sample:
    wall: float   # seconds, first generator start to last end
    busy: float   # CPU seconds of the generator threads' runs (see PktLab.generate)
    counts: dict

    @property
    def gen(self) -> int:
        return self.counts["gen"]

    @property
    def offered_mpps(self) -> float:
        return self.gen / self.wall / 1e6

    @property
    def forwarded_mpps(self) -> float:
        return self.counts["sink"] / self.wall / 1e6

    @property
    def per_core_mpps(self) -> float:
        """Frames forwarded per second of one core's busy time."""
        return self.counts["sink"] / self.busy / 1e6 if self.busy else 0.0

    @property
    def ns_per_pkt(self) -> float:
        """Core time per generated frame (generator + data path + sink)."""
        return self.busy * 1e9 / self.gen if self.gen else float("nan")


class Runner:
    """Measures a program on l0 with a traffic pattern, in a PktLab, with an optional
    xdplb Datapath whose counters go into the sample."""

    def __init__(self, lab: PktLab, dp: Optional[Datapath] = None, cpus: Sequence[int] = (),
                 batch: int = 64, rate: float = 0.0, duration: float = 0.5,
                 min_count: int = 20_000, max_count: int = 20_000_000,
                 probe_count: int = 20_000, count: int = 0):
        self.lab, self.dp = lab, dp
        self.cpus = list(cpus) or [sorted(os.sched_getaffinity(0))[-1]]
        self.batch, self.rate, self.duration = batch, rate, duration
        self.min_count, self.max_count = min_count, max_count
        self.probe_count = probe_count
        self.count = count  # fixed frames per measurement and thread (0: from duration)
        self._pps: dict[tuple, float] = {}

    def _ksoftirqd_ns(self) -> int:
        """Run time of the generator CPUs' ksoftirqd threads: softirq work deferred
        there happens outside the measured busy time (a diagnostic; ~1% here)."""
        if not hasattr(self, "_ksoft"):
            want = {f"ksoftirqd/{c}" for c in self.cpus}
            self._ksoft = []
            for p in os.listdir("/proc"):
                if p.isdigit():
                    try:
                        with open(f"/proc/{p}/comm") as f:
                            if f.read().strip() in want:
                                self._ksoft.append(int(p))
                    except OSError:
                        pass
        total = 0
        for pid in self._ksoft:
            try:
                with open(f"/proc/{pid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total

    def counters(self) -> dict:
        c = self.lab.bench_counts()
        c["ksoftirqd_ns"] = self._ksoftirqd_ns()
        if self.dp is not None:
            g = self.dp.global_counters()
            for k in LB_KEYS:
                c[k] = g[k]
        return c

    def once(self, prog: str, fd: int, traffic: Traffic, count: int) -> Sample:
        self.lab.set_l0(prog, fd)
        frame = self.lab.set_traffic(traffic)
        before = self.counters()
        wall, busy = self.lab.generate(frame, count, self.cpus, self.batch, self.rate)
        self.lab.settle()
        after = self.counters()
        return Sample(wall, busy, {k: after[k] - before[k] for k in after})

    def warm(self, prog: str, fd: int, traffic: Traffic) -> None:
        """Caches, JIT images, and (flows > 0) every flow once, so measured packets of a
        hit case are hits; also estimates the rate (per busy second of one core) to size
        the measured runs."""
        s = self.once(prog, fd, traffic, self.probe_count)
        self._pps[(prog, traffic)] = max(s.gen / max(s.busy, 1e-6) * len(self.cpus), 1.0)
        self.prime(prog, fd, traffic)

    def count_for(self, prog: str, traffic: Traffic) -> int:
        if self.count:
            return self.count
        if self.rate:
            pps = self.rate
        else:
            pps = self._pps.get((prog, traffic), 1e6)
        n = int(pps * self.duration / len(self.cpus))
        return max(self.min_count, min(self.max_count, n))

    def warmed(self, prog: str, traffic: Traffic) -> bool:
        return (prog, traffic) in self._pps

    def prime(self, prog: str, fd: int, traffic: Traffic) -> None:
        """Every flow of a bounded pattern once more (unmeasured): runs of new flows in
        between may have evicted them from the flow table / conntrack."""
        n = traffic.distinct_flows()
        if n:
            self.once(prog, fd, traffic, max(2 * n, 4096))

    def measure(self, prog: str, fd: int, traffic: Traffic) -> Sample:
        if (prog, traffic) not in self._pps:
            self.warm(prog, fd, traffic)
        elif prog != "floor":
            self.prime(prog, fd, traffic)
        return self.once(prog, fd, traffic, self.count_for(prog, traffic))


def summarize(samples: Sequence[Sample], floors: Sequence[Sample]) -> dict:
    """Medians over rounds; ratios per round against that round's floor, from per-core
    rates (busy time), so preemption by other work on the CPU does not enter them."""
    def med(xs):
        return round(statistics.median(xs), 3) if xs else None

    tot: dict = {}
    for s in samples:
        for k, v in s.counts.items():
            tot[k] = tot.get(k, 0) + v
    gen = tot.get("gen", 0)
    ns = [s.ns_per_pkt for s in samples]
    fns = [f.ns_per_pkt for f in floors]
    out = {"offered_mpps": med([s.offered_mpps for s in samples]),
           "forwarded_mpps": med([s.forwarded_mpps for s in samples]),
           "per_core_mpps": med([s.per_core_mpps for s in samples]),
           "loss": round(1 - tot.get("sink", 0) / gen, 6) if gen else None,
           "ns_per_pkt": round(statistics.median(ns), 1),
           "floor_per_core_mpps": med([f.per_core_mpps for f in floors]),
           "floor_ns_per_pkt": round(statistics.median(fns), 1) if floors else None,
           "per_core_mpps_all": [round(s.per_core_mpps, 3) for s in samples],
           "busy_s": round(sum(s.busy for s in samples), 4),
           "wall_s": round(sum(s.wall for s in samples), 4),
           "ksoftirqd_s": round(tot.get("ksoftirqd_ns", 0) / 1e9, 4),
           "forwarded_mpps_all": [round(s.forwarded_mpps, 3) for s in samples],
           "counters": tot}
    if floors:
        ratios = [s.per_core_mpps / f.per_core_mpps if f.per_core_mpps else float("nan")
                  for s, f in zip(samples, floors)]
        out["ratio"] = round(statistics.median(ratios), 3)
        out["ratio_all"] = [round(x, 3) for x in ratios]
        out["ns_over_floor"] = round(statistics.median([a - b for a, b in zip(ns, fns)]), 1)
    return out


# --- the xdplb cases --------------------------------------------------------------------
@dataclass
class Case:
    name: str
    traffic: Traffic
    desc: str
    encap: int = L.ENCAP_IPIP
    tx_mode: int = L.TX_XDP_TX
    baseline: str = "floor"   # floor | stack (non-VIP: also xdp_pass + the kernel stack)
    expect: tuple = ()        # counters that must all equal the first (xdplb's rx)
    zero: tuple = ()          # counters that must stay 0
    threads: int = 1


def v4_backend(i: int) -> ipaddress.IPv4Address:
    return ipaddress.ip_address(int(ipaddress.ip_address("10.244.0.0")) + 1 + i)


def v6_backend(i: int) -> ipaddress.IPv6Address:
    return ipaddress.ip_address(int(ipaddress.ip_address("fd44::")) + 1 + i)


def non_vip(vips: Sequence) -> ipaddress.IPv4Address:
    """A destination in OTHER_NET whose prefilter bit no VIP has: xdplb's pass path."""
    taken = {prefilter_index(v) for v in vips}
    base = int(ipaddress.ip_address(OTHER_NET.split("/")[0]))
    for i in range(1, 4096):
        a = ipaddress.ip_address(base + i)
        if prefilter_index(a) not in taken:
            return a
    raise RuntimeError("no non-VIP address outside the prefilter")


def make_cases(size: int = 64, flows: int = 1024, threads: int = 1,
               all_cores: int = 0) -> list[Case]:
    hit = Traffic("hit", size=size, flows=flows)
    syn = Traffic("syn", size=size, flows=0)
    other = Traffic("nonvip", dst=non_vip([VIP4, VIP6]), size=size, flows=flows)
    v6 = Traffic("ipv6", dst=VIP6, src=SRC6, size=max(size, 80), flows=flows)
    fwd = ("rx", "tx")
    cases = [
        Case("hit", hit, f"TCP to a VIP, {flows} flows all in the flow table, IPIP, XDP_TX",
             expect=fwd + ("flow_hit",), zero=("flow_miss", "drop")),
        Case("syn", syn, "TCP SYN, every packet a new flow (flow-table miss + insert), "
             "IPIP, XDP_TX", expect=fwd + ("flow_miss",), zero=("flow_hit", "drop")),
        Case("nonvip", other, "not to a VIP: xdplb passes it, the LB's kernel stack "
             "forwards it to the sink (ratio against xdp_pass + the same stack)",
             baseline="stack", expect=("rx", "pass"), zero=("tx", "drop")),
        Case("ipv6", v6, f"IPv6 TCP to a VIP, {flows} flows in the table, IP6IP6, XDP_TX "
             f"({max(size, 80)}-byte frames)", expect=fwd + ("flow_hit",),
             zero=("flow_miss", "drop")),
        Case("gue", hit, "as hit, GUE encapsulation (UDP, checksum computed)",
             encap=L.ENCAP_GUE, expect=fwd + ("flow_hit",), zero=("flow_miss", "drop")),
        Case("redirect", hit, "as hit, XDP_REDIRECT out of the second veth (devmap)",
             tx_mode=L.TX_REDIRECT, expect=("rx", "redirect", "flow_hit"),
             zero=("tx", "flow_miss", "drop")),
    ]
    if all_cores > 1:
        cases.append(Case(f"hit_{all_cores}cores", hit, f"as hit, {all_cores} generator "
                          f"threads on {all_cores} CPUs (veths with a queue per CPU)",
                          expect=fwd + ("flow_hit",), zero=("flow_miss", "drop"),
                          threads=all_cores))
    if threads > 1:
        for c in cases:
            c.threads = max(c.threads, threads)
    return cases


def lb_vips(backends: int = 100, ring_size: int = 65537) -> list[VipSpec]:
    b4 = tuple(BackendSpec(v4_backend(i), nexthop="nh") for i in range(backends))
    b6 = tuple(BackendSpec(v6_backend(i), nexthop="nh") for i in range(backends))
    return [VipSpec(VIP4, VIP_PORT, 6, b4, ring_size=ring_size),
            VipSpec(VIP6, VIP_PORT, 6, b6, ring_size=ring_size)]


class LbSetup:
    """xdplb loaded for the lab: egress config and tx port set, VIPs programmed."""

    def __init__(self, lab: PktLab, flow_table_size: int = 1 << 20, max_vips: int = 16384,
                 max_backends: int = 65536):
        self.lab = lab
        self.dp = Datapath(Limits(max_vips=max_vips, max_backends=max_backends,
                                  max_nexthops=64, flow_table_size=flow_table_size))
        try:
            self.prog = Programmer(self.dp)
            with lab.lb.entered():  # the devmap resolves the ifindex in the caller's netns
                self.dp.set_tx_port(lab.l1_index)
            self.mode: tuple = ()
            self.configure(L.ENCAP_IPIP, L.TX_XDP_TX)
        except BaseException:
            self.dp.close()
            raise

    def configure(self, encap: int, tx_mode: int) -> None:
        if self.mode == (encap, tx_mode):
            return
        self.dp.set_config(EgressConfig(smac=MAC["l0"] if tx_mode == L.TX_XDP_TX else
                                        MAC["l1"], encap=encap, tx_mode=tx_mode,
                                        source_v4=SOURCE4, source_v6=SOURCE6,
                                        gue_port=GUE_PORT, mtu=1500))
        self.mode = (encap, tx_mode)

    def apply(self, vips: Sequence[VipSpec], tx_mode: int = L.TX_XDP_TX):
        """Next hop MAC: the receiving end (g0 for XDP_TX, s0 for redirect)."""
        mac = MAC["g0"] if tx_mode == L.TX_XDP_TX else MAC["s0"]
        return self.prog.apply(list(vips), macs={"nh": mac})

    def fill_flow_table(self, runner: "Runner", dst=VIP4) -> dict:
        """New flows to dst:80 (a VIP) until the flow table is full, so every later
        new-flow run meets the steady state of a busy LB (each insert evicts) rather
        than an empty table. Returns what it did."""
        n = self.dp.limits.flow_table_size
        t = Traffic("fill", dst=dst, flows=0)
        s = runner.once("xdplb", self.dp.prog_fd, t, n)
        return {"flows_inserted": s.counts.get("flow_miss", 0), "table_size": n,
                "seconds": round(s.wall, 2)}

    def close(self) -> None:
        self.dp.close()


def check(entry: dict, expect: Sequence[str], zero: Sequence[str]) -> bool:
    """The path check: every counter in `expect` equals the first one (what the program
    under test received, e.g. xdplb's rx), which is nonzero; those in `zero` stayed 0.
    Loss (generated vs received vs sunk) is reported apart, not judged here."""
    c = entry["counters"]
    ref = c.get(expect[0], 0) if expect else 0
    return ref > 0 and all(c.get(k) == ref for k in expect) and \
        all(c.get(k, 0) == 0 for k in zero)


def pick_cpus(threads: int) -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise SystemExit(f"bench: {threads} generator threads, {len(allowed)} CPUs allowed")
    return allowed[-threads:]


def run_cases(lab: PktLab, lbs: LbSetup, cases: Sequence[Case], rounds: int = 3,
              duration: float = 0.5, batch: int = 64, rate: float = 0.0,
              quiet: bool = True, count: int = 0) -> dict:
    """Every case `rounds` times, each right after a floor measurement with the same
    traffic (and, for stack-baseline cases, a run of the reference program too)."""
    floor_fd, pass_fd = lab.prog("bench_floor"), lab.prog("xdp_pass")
    runners: dict[int, Runner] = {}

    def runner(threads: int) -> Runner:
        if threads not in runners:
            runners[threads] = Runner(lab, lbs.dp, pick_cpus(threads), batch, rate,
                                      duration, count=count,
                                      min_count=min(20_000, count or 20_000),
                                      probe_count=min(20_000, count or 20_000))
        return runners[threads]

    fill = None
    if any(c.traffic.new_flows for c in cases):
        lbs.apply(lb_vips())
        fill = lbs.fill_flow_table(runner(1))
    samples: dict[str, list] = {c.name: [] for c in cases}
    floors: dict[str, list] = {c.name: [] for c in cases}
    refs: dict[str, list] = {c.name: [] for c in cases}
    for rnd in range(rounds):
        for c in cases:
            r = runner(c.threads)
            lbs.configure(c.encap, c.tx_mode)
            lbs.apply(lb_vips(), c.tx_mode)
            floors[c.name].append(r.measure("floor", floor_fd, c.traffic))
            if c.baseline == "stack":
                refs[c.name].append(r.measure("stack", pass_fd, c.traffic))
            samples[c.name].append(r.measure("xdplb", lbs.dp.prog_fd, c.traffic))
            if not quiet:
                s = samples[c.name][-1]
                print(f"  round {rnd + 1}/{rounds} {c.name:12} {s.per_core_mpps:6.2f} Mpps/core "
                      f"(floor {floors[c.name][-1].per_core_mpps:.2f})", flush=True)
    out: dict = {}
    for c in cases:
        e = summarize(samples[c.name], floors[c.name])
        e.update({"desc": c.desc, "threads": c.threads, "frame_bytes": c.traffic.size,
                  "flows": c.traffic.distinct_flows() or "new per packet",
                  "expect": list(c.expect), "ok": check(e, c.expect, c.zero),
                  "baseline": c.baseline})
        if c.baseline == "stack":
            ref = summarize(refs[c.name], floors[c.name])
            e["stack_per_core_mpps"] = ref["per_core_mpps"]
            ratios = [s.per_core_mpps / f.per_core_mpps if f.per_core_mpps else math.nan
                      for s, f in zip(samples[c.name], refs[c.name])]
            e["ratio_to_stack"] = round(statistics.median(ratios), 3)
            e["stack_counters"] = ref["counters"]
        fl = summarize(floors[c.name], [])
        e["floor_counters"] = fl["counters"]
        e["floor_ok"] = check(fl, ("floor_tx",), ())
        out[c.name] = e
    return {"cases": out, "flow_table_fill": fill}


# --- kernel pktgen (edge nodes) --------------------------------------------------------
PKTGEN_DIR = "/proc/net/pktgen"


class KernelPktgen:
    """The kernel's packet generator, driven through /proc/net/pktgen of the generator's
    namespace: one pktgen thread (kpktgend_<cpu>) per CPU used, each with its own copy of
    the device (DEV@cpu). UDP only; flows = pktgen's "flows" with a range of source
    ports; rate in packets per second (ratep). Not available on this test machine (no
    pktgen in the kernel), so only the command plan is exercised here."""

    @staticmethod
    def available(ns: Optional[N.Netns] = None) -> bool:
        if ns is None:
            return os.path.isdir(PKTGEN_DIR)
        with ns.entered():
            return os.path.isdir("/proc/thread-self/net/pktgen")

    @staticmethod
    def plan(dev: str, traffic: Traffic, count: int, cpus: Sequence[int],
             dst_mac: bytes, rate: float = 0.0, clone_skb: int = 0) -> list[tuple]:
        """(file, command) pairs, in order; files relative to /proc/net/pktgen."""
        if traffic.proto != 17:
            raise ValueError("kernel pktgen sends UDP only")
        cmds: list[tuple] = [("pgctrl", "reset")]
        per_rate = int(rate / len(cpus)) if rate else 0
        for cpu in cpus:
            th, d = f"kpktgend_{cpu}", f"{dev}@{cpu}"
            cmds += [(th, "rem_device_all"), (th, f"add_device {d}")]
            fam6 = traffic.family == 6
            cmds += [(d, f"count {count}"), (d, f"clone_skb {clone_skb}"),
                     (d, f"pkt_size {traffic.size}"),  # without the FCS, like ours
                     (d, "burst 32"), (d, f"dst_mac {N._mac_str(dst_mac)}"),
                     (d, f"queue_map_min {cpu}"), (d, f"queue_map_max {cpu}")]
            if fam6:
                cmds += [(d, "flag IPV6"), (d, f"dst6 {traffic.dst}"),
                         (d, f"src6 {traffic.src}")]
            else:
                last = ipaddress.ip_address(int(traffic.dst) + max(traffic.vips, 1) - 1)
                cmds += [(d, f"dst_min {traffic.dst}"), (d, f"dst_max {last}"),
                         (d, f"src_min {traffic.src}"), (d, f"src_max {traffic.src}")]
            flows = traffic.flows or 65535
            cmds += [(d, f"udp_dst_min {traffic.dport}"), (d, f"udp_dst_max {traffic.dport}"),
                     (d, f"udp_src_min {SPORT_BASE}"),
                     (d, f"udp_src_max {SPORT_BASE + min(flows, SPORT_SPAN) - 1}"),
                     (d, "flag UDPSRC_RND" if traffic.new_flows else "flag !UDPSRC_RND"),
                     (d, f"flows {flows}"), (d, "flowlen 1")]
            if per_rate:
                cmds.append((d, f"ratep {per_rate}"))
        cmds.append(("pgctrl", "start"))
        return cmds

    @staticmethod
    def parse_result(text: str) -> dict:
        """The "Result: OK: ..." block of a device file -> {'ok', 'usec', 'packets',
        'pps', 'errors'}."""
        import re

        out = {"ok": "Result: OK" in text}
        m = re.search(r"OK:\s*(\d+)\(c\d+\+d\d+\)\s*usec,\s*(\d+)\s*\(", text)
        if m:
            out["usec"], out["packets"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"(\d+)pps", text)
        if m:
            out["pps"] = int(m.group(1))
        m = re.search(r"errors:\s*(\d+)", text)
        if m:
            out["errors"] = int(m.group(1))
        return out

    def run(self, ns: N.Netns, dev: str, traffic: Traffic, count: int, cpus: Sequence[int],
            dst_mac: bytes, rate: float = 0.0) -> tuple[float, list[dict]]:
        """Runs the plan inside `ns` (pgctrl "start" blocks until done); returns (wall
        seconds, one parsed result per device copy)."""
        plan = self.plan(dev, traffic, count, cpus, dst_mac, rate)
        with ns.entered():
            base = "/proc/thread-self/net/pktgen"
            t0 = time.perf_counter()
            for f, cmd in plan:
                with open(os.path.join(base, f), "w") as fh:
                    fh.write(cmd + "\n")
            wall = time.perf_counter() - t0
            res = []
            for cpu in cpus:
                with open(os.path.join(base, f"{dev}@{cpu}")) as fh:
                    res.append(self.parse_result(fh.read()))
        return wall, res


# --- entry point ---------------------------------------------------------------------------
def run_pktgen(out: Optional[str] = None, rounds: int = 3, duration: float = 0.5,
               size: int = 64, flows: int = 1024, threads: int = 1, rate: float = 0.0,
               batch: int = 64, cases: Optional[Sequence[str]] = None, count: int = 0,
               all_cores: bool = True, quiet: bool = False, generator: str = "auto",
               lab: Optional[PktLab] = None, plot: bool = True,
               flow_table_size: int = 1 << 20) -> dict:
    """Every case against the floor -> pktgen.json (+ pktgen.png).
    `generator`: auto | live | pktgen.
    The kernel's pktgen is used only when asked for (generator="pktgen") or, with
    "auto", when the kernel has it; it sends UDP only (see KernelPktgen), so on such
    machines the live-frames generator still runs the TCP cases."""
    ncpu = len(os.sched_getaffinity(0))
    todo = make_cases(size, flows, threads, ncpu if all_cores and threads == 1 else 0)
    if cases:
        unknown = set(cases) - {c.name for c in todo}
        if unknown:
            raise SystemExit(f"bench: unknown pktgen case(s) {sorted(unknown)}; known: "
                             f"{[c.name for c in todo]}")
        todo = [c for c in todo if c.name in cases]
    has_pktgen = KernelPktgen.available()
    if generator == "pktgen" and not has_pktgen:
        raise SystemExit("bench: this kernel has no pktgen (/proc/net/pktgen); "
                         "use --generator live")
    own_lab = lab is None
    lab = lab or PktLab()
    if own_lab:
        lab.up()
    try:
        lbs = LbSetup(lab, flow_table_size=flow_table_size)
        try:
            results = run_cases(lab, lbs, todo, rounds, duration, batch, rate, quiet, count)
            fill = results["flow_table_fill"]
            results = results["cases"]
            pg = None
            if has_pktgen and generator in ("auto", "pktgen"):
                pg = _pktgen_cases(lab, lbs, size, flows, threads, rate, duration)
        finally:
            lbs.close()
    finally:
        if own_lab:
            lab.down()
    doc = {"generator": "live-frames (bench_gen, BPF_F_TEST_XDP_LIVE_FRAMES)",
           "kernel_pktgen": "available" if has_pktgen else "not in this kernel",
           "machine": machine_info(pick_cpus(1)[0]),
           "params": {"rounds": rounds, "duration_s": duration, "frame_bytes": size,
                      "flows": flows, "threads": threads, "rate_pps": rate or None,
                      "count": count or None,
                      "batch": batch, "backends_per_vip": 100, "ring_size": 65537,
                      "flow_table_size": flow_table_size, "flow_table_fill": fill},
           "method": "one CPU per generator thread runs generator + data path + sink; "
                     "per_core_mpps = frames sunk / busy seconds (kernel test-run "
                     "duration); ratio = case per-core Mpps / floor per-core Mpps "
                     "(bench_floor: MAC swap + XDP_TX on the same veth, same traffic, "
                     "measured right before the case in each round); medians over rounds",
           "cases": results}
    if pg is not None:
        doc["kernel_pktgen_cases"] = pg
    d = results_dir(out)
    path = d / "pktgen.json"
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    if plot:
        doc["plot"] = str(plot_pktgen(doc, d / "pktgen.png"))
    if not quiet:
        print_pktgen(doc, path)
    return doc


def _pktgen_cases(lab: PktLab, lbs: LbSetup, size: int, flows: int, threads: int,
                  rate: float, duration: float) -> dict:
    """UDP hit traffic from the kernel's pktgen on g0, xdplb and floor on l0 (only where
    the kernel has pktgen)."""
    vip = VipSpec(VIP4, VIP_PORT, 17, lb_vips()[0].backends, ring_size=65537)
    lbs.configure(L.ENCAP_IPIP, L.TX_XDP_TX)
    lbs.apply([vip] + lb_vips())
    t = Traffic("udp", proto=17, size=size, flows=flows)
    pg = KernelPktgen()
    cpus = pick_cpus(threads)
    count = int((rate or 2e6) * duration / len(cpus))
    out = {}
    for name, fd in (("floor", lab.prog("bench_floor")), ("xdplb", lbs.dp.prog_fd)):
        lab.set_l0(name, fd)
        before = lab.bench_counts()
        wall, res = pg.run(lab.ns["g"], "g0", t, count, cpus, MAC["l0"], rate)
        after = lab.settle()
        sent = sum(r.get("packets", 0) for r in res)
        sink = after["sink"] - before["sink"]
        out[name] = {"offered_mpps": round(sent / wall / 1e6, 3),
                     "forwarded_mpps": round(sink / wall / 1e6, 3),
                     "loss": round(1 - sink / sent, 6) if sent else None, "results": res}
    if out["floor"]["forwarded_mpps"]:
        out["ratio"] = round(out["xdplb"]["forwarded_mpps"] / out["floor"]["forwarded_mpps"],
                             3)
    return out


def plot_pktgen(doc: dict, path: Path) -> Path:
    """Per-core Mpps of every case next to its floor (and the kernel stack reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["cases"])
    cs = [doc["cases"][n] for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [c["floor_per_core_mpps"] for c in cs], w, color="tab:gray",
           label="floor: MAC swap + XDP_TX (same traffic, same round)")
    bars = ax.bar([i + w / 2 for i in x], [c["per_core_mpps"] for c in cs], w,
                  color="tab:blue", label="xdplb")
    for b, c in zip(bars, cs):
        label = (f"{c['ratio_to_stack']:.2f}x stack" if c.get("ratio_to_stack") is not None
                 else f"{c['ratio']:.2f}x")
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    for i, c in enumerate(cs):
        if c.get("stack_per_core_mpps"):
            ax.plot([i + w / 2], [c["stack_per_core_mpps"]], "r_", markersize=22, mew=2,
                    label="kernel stack forwarding (xdp_pass), non-VIP")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names)
    ax.set_ylabel("Mpps per core")
    top = max(max(c["floor_per_core_mpps"], c["per_core_mpps"]) for c in cs)
    ax.set_ylim(0, top * 1.35)
    m = doc["machine"]
    ax.set_title(f"xdplb vs floor, one core runs generator + data path + sink "
                 f"({m['cpu_model']}, kernel {m['kernel']})", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_pktgen(doc: dict, path: Path | str = "") -> None:
    m = doc["machine"]
    print(f"packet rate through veths ({doc['generator']}; {m['cpu_model']}, "
          f"{m['cores']} cores, kernel {m['kernel']})")
    print("offered/fwd: Mpps over wall time (all threads); /core: forwarded per second of "
          "one core's busy time,\nwhich runs generator + data path + sink; floor: "
          "bench_floor, same traffic, same round")
    print(f"{'case':12} {'offered':>8} {'fwd':>7} {'loss':>8} {'/core':>7} {'floor':>7} "
          f"{'ratio':>6} {'ns/pkt':>7} {'+floor':>7}  check")
    for name, c in doc["cases"].items():
        loss = f"{c['loss'] * 100:.3f}%" if c["loss"] is not None else "-"
        extra = ""
        if c.get("ratio_to_stack") is not None:
            extra = (f"  (kernel stack alone {c['stack_per_core_mpps']:.2f} Mpps/core, "
                     f"ratio {c['ratio_to_stack']:.2f})")
        print(f"{name:12} {c['offered_mpps']:8.2f} {c['forwarded_mpps']:7.2f} {loss:>8} "
              f"{c['per_core_mpps']:7.2f} {c['floor_per_core_mpps']:7.2f} {c['ratio']:6.2f} "
              f"{c['ns_per_pkt']:7.1f} {c['ns_over_floor']:7.1f}  "
              f"{'ok' if c['ok'] else 'PATH CHECK FAILED'}{extra}")
    busy = sum(c["busy_s"] for c in doc["cases"].values())
    wall = sum(c["wall_s"] * c["threads"] for c in doc["cases"].values())
    soft = sum(c["ksoftirqd_s"] for c in doc["cases"].values())
    if wall and busy and not doc["params"].get("rate_pps"):
        print(f"generator threads ran {100 * busy / wall:.0f}% of wall time (the rest: other "
              f"work on the CPU); softirq deferred to ksoftirqd: {100 * soft / busy:.1f}% "
              f"of busy time")
    if path:
        print(f"-> {path}" + (f", {doc['plot']}" if doc.get("plot") else ""))
