"""What the live-frames generator sends: a Traffic pattern (family, protocol, frame size,
flow and destination counts), the bench_gen config that varies its flow fields per run
(mirror of struct bench_gen_cfg in bench.bpf.c), and expected_frame, the Python mirror of
what bench_gen writes (for tests).

bench_gen writes the whole template into every frame (live-frame pages are recycled without
restoring their contents, and the LB rewrites what it receives) and varies the flow fields
itself, keeping IPv4 header and TCP/UDP checksums valid (the kernel stack, on the iptables
path, checks them).
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from dataclasses import dataclass

from . import frames

VIP4 = ipaddress.ip_address("10.96.0.10")
VIP6 = ipaddress.ip_address("fd00:96::10")
SRC4 = ipaddress.ip_address("172.16.0.1")
SRC6 = ipaddress.ip_address("fd16::1")
VIP_PORT = 80
SPORT_BASE, SPORT_SPAN = 1024, 64512
GEN_FIELDS = 4


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
        flags = frames.TCP_SYN if self.new_flows else frames.TCP_ACK
        return frames.frame(self.proto, self.src, SPORT_BASE, self.dst, self.dport,
                            self.size, flags, smac, dmac)

    def distinct_flows(self) -> int:
        """Flows the generator cycles through (0: unbounded)."""
        if self.new_flows:
            return 0
        per = -(-self.flows // self.vips)
        sport = min(per, SPORT_SPAN)
        return self.vips * sport * -(-per // SPORT_SPAN)

    def gen_cfg(self) -> GenCfg:
        off = frames.V4 if self.family == 4 else frames.V6
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
        struct.pack_into("!H", b, 24, frames.checksum(bytes(b[14:34])))
        proto, src, dst, l4 = b[23], bytes(b[26:30]), bytes(b[30:34]), 34
        seg_len = struct.unpack_from("!H", b, 16)[0] - 20
    else:
        proto, src, dst, l4 = b[20], bytes(b[22:38]), bytes(b[38:54]), 54
        seg_len = struct.unpack_from("!H", b, 18)[0]
    coff = l4 + (16 if proto == 6 else 6)
    struct.pack_into("!H", b, coff, 0)
    seg = frames.with_l4_csum(proto, bytes(b[l4:l4 + seg_len]),
                              frames.pseudo_header(src, dst, proto, seg_len))
    b[l4:l4 + seg_len] = seg
    return bytes(b)
