"""bench.bpf.o loaded (bpf/bench.bpf.c): its programs by name, and the template, the
generator config and the per-CPU counters that bench_restore, bench_gen, bench_floor and
bench_sink share. Used by the cost benchmark (bench/cost.py) and the packet lab
(bench/pktlab.py)."""

from __future__ import annotations

import ctypes
import struct
from typing import Optional

from lb import layout, native

# bench_stats indexes (enum in bench.bpf.c)
B_RUNS, B_FLOOR_TX, B_SINK_PKTS, B_SINK_BYTES, B_GEN = range(5)


class BenchObject:
    """close() when done."""

    def __init__(self):
        self.skel = native.Skeleton("bench")
        try:
            self.skel.load()
            self.stats = self.skel.map("bench_stats")
            self.template = self.skel.map("bench_template")
            self.gen_cfg = self.skel.map("bench_gen_cfg")
        except BaseException:
            self.skel.close()
            raise

    def prog_fd(self, name: str) -> int:
        return self.skel.prog_fd(name)

    def map(self, name: str) -> native.Map:
        return self.skel.map(name)

    def stat(self, idx: int) -> list[int]:
        """bench_stats[idx] of every CPU."""
        return [struct.unpack("=Q", v[:8])[0]
                for v in self.stats.lookup_percpu(ctypes.c_uint32(idx))]

    def set_template(self, data: bytes, vary_off: int = 0, vary2_off: int = 0) -> None:
        """The frame bench_restore / bench_gen write (its first len(data) bytes, at most
        the template's size); vary_off / vary2_off: bench_restore's per-run writes (0: off)."""
        t = layout.BenchTemplate()
        t.len = len(data)
        t.data[:len(data)] = data
        if vary_off:
            t.vary, t.vary_off = 1, vary_off
        if vary2_off:
            t.vary2, t.vary2_off = 1, vary2_off
        self.template.update(ctypes.c_uint32(0), t)

    def set_gen_cfg(self, cfg: Optional[ctypes.Structure] = None) -> None:
        """bench_gen_cfg (a bench.traffic.GenCfg); None: zeroes (the template as it is)."""
        self.gen_cfg.update(ctypes.c_uint32(0), cfg if cfg is not None
                            else bytes(self.gen_cfg.value_size))

    def close(self) -> None:
        self.skel.close()
