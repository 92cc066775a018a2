"""The packet lab: three namespaces with unique names, removed afterwards, and bench.bpf.o
(generator, floor, sinks and their counters) loaded once.

    gen ns              LB ns                                  sink ns
    [g0] <--- veth ---> [l0]  program under test (native XDP)
    bench_sink          [l1] <------------- veth --------------> [s0] bench_sink

XDP_TX from l0 goes back to g0 (bench_sink counts it); XDP_REDIRECT and the kernel
stack's forwarding go out l1 to s0. IPv6 is disabled on the interfaces (no stray
neighbour discovery frames in the sink counts; XDP still forwards IPv6 traffic). The veths
have one queue per CPU, so N generator threads on N CPUs each have their own.

The generator is bench.bpf.c's `bench_gen` run by BPF_PROG_TEST_RUN with
BPF_F_TEST_XDP_LIVE_FRAMES, so each run is a frame really transmitted (XDP_TX) out of g0
into l0. Its thread is pinned to one CPU, and everything downstream runs there too:
bench_gen's XDP_TX flush schedules l0's NAPI on the local CPU, which runs the program
under test in softirq right after each batch, and its XDP_TX schedules g0's (the sink).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Optional, Sequence

from lb import native
from lb.lab import namespaces, netns
from lb.lab.decap import load_decap

from . import frames
from .benchobj import B_FLOOR_TX, B_GEN, B_SINK_BYTES, B_SINK_PKTS, BenchObject
from .traffic import Traffic

TEST_XDP_MAX_BATCH = 256  # the kernel's limit on a live-frames batch

# lab addressing
MAC = {"g0": bytes.fromhex("027800000001"), "l0": bytes.fromhex("027800000002"),
       "l1": bytes.fromhex("027800000003"), "s0": bytes.fromhex("027800000004")}
NET = {"g0": "10.30.0.2/24", "l0": "10.30.0.1/24", "l1": "10.31.0.1/24", "s0": "10.31.0.2/24"}
SINK_GW = "10.31.0.2"
BACKEND_NET4 = "10.244.0.0/16"   # backends (iptables DNAT targets) routed to the sink side
BACKEND_NET6 = "fd44::/64"
OTHER_NET = "10.33.0.0/16"       # non-VIP destinations, routed by the LB's stack to the sink


class PktLab:
    """gen ns [g0] <-> [l0 LB ns l1] <-> [s0] sink ns, and bench.bpf.c loaded once
    (generator, floor, sinks and their counters). Use as a context manager."""

    def __init__(self, prefix: str = "xp", queues: Optional[int] = None):
        self.prefix = prefix
        self.queues = queues or os.cpu_count() or 1
        self.ns: dict[str, netns.Netns] = {}
        self.bench: Optional[BenchObject] = None
        self.decap: Optional[native.Skeleton] = None  # its xdp_pass: see pass_fd
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
            ns = netns.Netns(namespaces.unique_name(f"{self.prefix}{role}"))
            self.ns[role] = ns
            for k in ("all", "default"):
                ns.sysctl(f"net.ipv6.conf.{k}.disable_ipv6", 1)
        g, lb, s = self.ns["g"], self.ns["l"], self.ns["s"]
        self.g0_index, _ = netns.add_veth("g0", g, "l0", lb, mac_a=MAC["g0"], mac_b=MAC["l0"],
                                          queues=self.queues)
        self.l1_index, _ = netns.add_veth("l1", lb, "s0", s, mac_a=MAC["l1"], mac_b=MAC["s0"],
                                          queues=self.queues)
        for name, ns in (("g0", g), ("l0", lb), ("l1", lb), ("s0", s)):
            ns.add_address(name, NET[name])
        lb.router()
        lb.add_neighbor("l1", SINK_GW, MAC["s0"])
        lb.add_neighbor("l0", NET["g0"].split("/")[0], MAC["g0"])
        for net in (BACKEND_NET4, OTHER_NET):
            lb.add_route(net, via=SINK_GW)
        self.bench = BenchObject()
        self.decap = load_decap()
        self.gen_fd = self.bench.prog_fd("bench_gen")
        g.xdp_attach("g0", self.bench.prog_fd("bench_sink"), "native")
        s.xdp_attach("s0", self.bench.prog_fd("bench_sink"), "native")

    def down(self) -> None:
        for ns in reversed(list(self.ns.values())):
            with contextlib.suppress(Exception):
                ns.remove()
        self.ns.clear()
        if self.bench is not None:
            self.bench.close()
            self.bench = None
        if self.decap is not None:
            self.decap.close()
            self.decap = None

    def __enter__(self) -> "PktLab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def lb(self) -> netns.Netns:
        return self.ns["l"]

    # --- programs ------------------------------------------------------------------
    def set_l0(self, name: str, fd: int) -> None:
        """Attach (or replace with) program `fd` natively on l0; `name` labels it.
        Always attaches: an fd number may have been reused by another program since."""
        self.lb.xdp_attach("l0", fd, "native")
        self.on_l0 = name

    def prog(self, name: str) -> int:
        return self.bench.prog_fd(name)

    @property
    def pass_fd(self) -> int:
        """lb.lab.decap's xdp_pass (XDP_PASS only): the reference program on l0."""
        return self.decap.prog_fd("xdp_pass")

    # --- generator -------------------------------------------------------------------
    def set_traffic(self, t: Traffic) -> bytes:
        frame = t.frame(MAC["g0"], MAC["l0"])
        tl = min(len(frame) // 8 * 8, frames.TMPL_MAX)
        hdr = frames.ETH_HLEN + (20 if t.family == 4 else 40) + (20 if t.proto == 6 else 8)
        if tl < hdr:
            raise ValueError(f"frame of {len(frame)} bytes: headers do not fit the template")
        self.bench.set_template(frame[:tl])
        self.bench.set_gen_cfg(t.gen_cfg())
        return frame

    def bench_counts(self) -> dict:
        out = {}
        for name, idx in (("gen", B_GEN), ("floor_tx", B_FLOOR_TX), ("sink", B_SINK_PKTS),
                          ("sink_bytes", B_SINK_BYTES)):
            out[name] = sum(self.bench.stat(idx))
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
                        ns = self._send(frame, count, batch)
                    else:
                        # each call costs ~25 ms of set-up and tear-down here (an RCU
                        # grace period): pace in 100 ms bursts
                        chunk = max(batch, int(per_rate / 10))
                        sent = 0
                        while sent < count:
                            n = min(chunk, count - sent)
                            ns += self._send(frame, n, batch)
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

    def _send(self, frame: bytes, count: int, batch: int) -> int:
        """`count` live frames from bench_gen out of g0 (call inside the gen namespace,
        where the ifindex is resolved); the kernel's ns for all of them."""
        r = native.test_run(self.gen_fd, frame, repeat=count,
                            flags=native.lib.BPF_F_TEST_XDP_LIVE_FRAMES,
                            ingress_ifindex=self.g0_index,
                            batch_size=min(batch, TEST_XDP_MAX_BATCH))
        return r.duration_ns * count

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
