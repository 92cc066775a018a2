"""xdplb's TOML configuration: parsed into frozen dataclasses, validated completely.

Validation never stops at the first problem: `load_config` collects every problem it can
find and raises one `ConfigError` (lb/errors.py) whose `.problems` lists them, one
line each, naming the key and the VIP/backend, e.g.

    lb.ring_size: 65536 is not prime (nearest primes: 65521, 65537)
    vip "web" backend 10.1.0.300: address: "10.1.0.300" is not an IP address
    unknown key lb.interfac (did you mean "interface"?)

This module is the schema, with a [[vip]] and its backends in lb/vipconfig.py, [health] in
lb/healthconfig.py and a VIP's QUIC keys in lb/quicconfig.py; reading a typed table and
collecting its problems is lb/tomltable.py, checks of single values (addresses, names,
HOST:PORT, primes) lb/valuecheck.py.

Only what the file alone proves wrong is an error. Whatever depends on the machine (does the
interface exist, which outer source address a backend family gets when `source_v4`/`source_v6`
is absent) is resolved and reported at run time.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import ConfigError
from .healthconfig import HealthSection, parse_health_defaults
from .tomltable import Table, parse_toml, read_text
from .valuecheck import U32_MAX, fmt, next_prime, split_host_port
from .vipconfig import WEIGHT_MAX, Vip, parse_vips

PathLike = Union[str, os.PathLike]

XDP_MODES = ("auto", "native", "generic")
ENCAPS = ("ipip", "gue")
LOG_FORMATS = ("console", "json")

RING_SLOTS_PER_BACKEND = 100  # ring_size must be a prime > 100 x backends of any VIP
RING_SIZE_MIN = 101
RING_SIZE_MAX = 1 << 24       # 32 or 64 MiB of ring per VIP; Maglev build time grows with it
# kernel routing tables that are the system's: unspec, compat, default, main, local
RESERVED_TABLES = (0, 252, 253, 254, 255)
WITHDRAW_DELAY_MAX = 600.0


# --- the parsed configuration ------------------------------------------------------------

@dataclass(frozen=True)
class LbSection:
    """[lb]: where the data path attaches and how it encapsulates."""

    interface: str
    egress_interface: Optional[str] = None
    xdp_mode: str = "auto"
    encap: str = "ipip"
    gue_port: int = 6080
    source_v4: Optional[ipaddress.IPv4Address] = None
    source_v6: Optional[ipaddress.IPv6Address] = None
    ring_size: int = 65537
    flow_table_size: int = 1000000
    flow_insert_limit: int = 25000  # per CPU per second; README: why this value
    too_big_per_sec: int = 1000     # ICMP too-big answers per CPU per second; 0: none
    bpf_pin_path: str = "/sys/fs/bpf/xdplb"
    control_socket: str = "/run/xdplb/control.sock"
    state_file: str = "/var/lib/xdplb/state.json"
    metrics_listen: Optional[str] = None
    log_format: str = "console"
    keep_datapath_on_exit: bool = False
    answer_ping: bool = True
    max_vips: int = 4096
    max_backends: int = 65536

    @property
    def metrics_address(self) -> Optional[tuple[str, int]]:
        """`metrics_listen` as (host, port), IPv6 brackets removed; None when not set."""
        if self.metrics_listen is None:
            return None
        host, port = split_host_port(self.metrics_listen)
        return host, int(port)


@dataclass(frozen=True)
class AnnounceSection:
    """[announce]: while a VIP is announced, a blackhole route for its address stays in
    kernel routing table `table` (lb/announce.py), for the node's routing daemon to
    export over BGP."""

    table: int = 200
    min_backends: int = 1
    withdraw_delay: float = 5.0


@dataclass(frozen=True)
class Config:
    lb: LbSection
    health: HealthSection
    vips: tuple[Vip, ...]
    source: Optional[Path] = None
    announce: Optional[AnnounceSection] = None  # None: nothing is announced

    @property
    def backend_count(self) -> int:
        """VIP/backend pairs (a backend serving two VIPs counts twice)."""
        return sum(len(v.backends) for v in self.vips)

    def vip(self, name: str) -> Optional[Vip]:
        return next((v for v in self.vips if v.name == name), None)


# --- public entry points -----------------------------------------------------------------

def load_config(path: PathLike) -> Config:
    """Read, parse and validate the file at `path`; raise ConfigError listing every
    problem (an unreadable file is one problem naming the path)."""
    p = Path(path)
    text = read_text(p)
    return parse_config(text, source=p)


def parse_config(text: str, source: Optional[Path] = None) -> Config:
    """Parse and validate TOML text; raise ConfigError listing every problem."""
    data = parse_toml(text)
    problems: list[str] = []
    config = _build_config(data, source, problems)
    if problems or config is None:
        raise ConfigError(problems or ["configuration is invalid"])
    return config


def check(path: PathLike) -> tuple[bool, list[str]]:
    """For `xdplb check`: (True, ["ok: N vips, M backends"]) or (False, problems)."""
    from .capacity import require_memory  # the machine's side: map memory

    try:
        config = load_config(path)
        require_memory(config)
    except ConfigError as e:
        return False, e.problems
    return True, [f"ok: {len(config.vips)} vips, {config.backend_count} backends"]


# --- sections ----------------------------------------------------------------------------

def _build_config(data: dict, source: Optional[Path], problems: list[str]
                  ) -> Optional[Config]:
    """The Config, or None when `problems` received anything."""
    top = Table(data, problems)
    lb = _parse_lb(Table(top.table("lb") or {}, problems, prefix="lb."))
    bad_lb_keys = {p.split(":", 1)[0] for p in problems}
    health = parse_health_defaults(Table(top.table("health") or {}, problems,
                                           prefix="health."))
    vips = parse_vips(top.tables("vip", "vip") or [], health, problems)
    announce_table = top.table("announce")
    announce = (_parse_announce(Table(announce_table, problems, prefix="announce."), vips)
                if announce_table is not None else None)
    top.finish()
    _check_vips_against_lb(vips, lb, bad_lb_keys, problems)
    if problems:
        return None
    return Config(lb=lb, health=health, vips=tuple(vips), source=source, announce=announce)


def _parse_lb(t: Table) -> LbSection:
    """[lb]; an invalid value is reported and replaced by its default (interface: "")."""
    d = LbSection(interface="")
    interface = t.interface("interface", required=True)
    egress = t.interface("egress_interface")
    values = dict(
        egress_interface=egress,
        xdp_mode=t.choice("xdp_mode", d.xdp_mode, XDP_MODES),
        encap=t.choice("encap", d.encap, ENCAPS),
        gue_port=t.integer("gue_port", d.gue_port, 1, 65535),
        source_v4=t.address("source_v4", version=4),
        source_v6=t.address("source_v6", version=6),
        ring_size=t.prime("ring_size", d.ring_size, RING_SIZE_MIN, RING_SIZE_MAX),
        flow_table_size=t.integer("flow_table_size", d.flow_table_size, 1, U32_MAX),
        flow_insert_limit=t.integer("flow_insert_limit", d.flow_insert_limit, 0, U32_MAX),
        too_big_per_sec=t.integer("too_big_per_sec", d.too_big_per_sec, 0, U32_MAX),
        bpf_pin_path=_bpf_pin_path(t, d.bpf_pin_path),
        control_socket=t.socket_path("control_socket", d.control_socket),
        state_file=t.path("state_file", d.state_file),
        metrics_listen=t.listen("metrics_listen"),
        log_format=t.choice("log_format", d.log_format, LOG_FORMATS),
        keep_datapath_on_exit=t.boolean("keep_datapath_on_exit", d.keep_datapath_on_exit),
        answer_ping=t.boolean("answer_ping", d.answer_ping),
        max_vips=t.integer("max_vips", d.max_vips, 2, 1 << 20),
        max_backends=t.integer("max_backends", d.max_backends, 2, 1 << 24),
    )
    t.finish()
    return LbSection(interface=interface or "", **values)


def _bpf_pin_path(t: Table, default: str) -> str:
    path = t.path("bpf_pin_path", default)
    if not path.startswith("/"):
        t.report("bpf_pin_path", f"{fmt(path)} must be an absolute path on a bpffs mount "
                                 f"(e.g. /sys/fs/bpf/xdplb)")
        return default
    return path


def _parse_announce(t: Table, vips: Sequence[Vip]) -> AnnounceSection:
    """[announce]; an invalid value is reported and replaced by its default."""
    d = AnnounceSection()
    table = t.integer("table", d.table, 1, U32_MAX)
    if table in RESERVED_TABLES:
        t.report("table", f"{table} is one of the kernel's own tables (0, 252-255); pick an "
                          f"unused one, e.g. 200")
        table = d.table
    min_backends = t.integer("min_backends", d.min_backends, 1, WEIGHT_MAX)
    withdraw_delay = t.seconds("withdraw_delay", d.withdraw_delay, WITHDRAW_DELAY_MAX)
    t.finish()
    for vip in vips:  # such a VIP would never be announced
        if len(vip.backends) < min_backends:
            t.report("min_backends", f"{min_backends} exceeds the {len(vip.backends)} "
                                     f"backend(s) of vip {fmt(vip.name)}, which would never "
                                     f"be announced; lower it or add backends")
            break
    return AnnounceSection(table=table, min_backends=min_backends,
                           withdraw_delay=withdraw_delay)


def _check_vips_against_lb(vips: Sequence[Vip], lb: LbSection, bad_lb_keys: set[str],
                           problems: list[str]) -> None:
    """What needs every VIP at once: uniqueness, map sizes, ring size (each skipped when
    its [lb] key was itself invalid, so a default nobody wrote is never blamed)."""
    names: dict[str, int] = {}
    idents: dict[tuple, Vip] = {}
    for index, vip in enumerate(vips, 1):
        first = names.setdefault(vip.name, index)
        if first != index:
            problems.append(f"vip {fmt(vip.name)}: duplicate name (vips #{first} and #{index})")
        other = idents.setdefault(vip.ident, vip)
        if other is not vip:
            problems.append(f"vip {fmt(vip.name)}: duplicate of vip {fmt(other.name)} "
                            f"(same address, port, protocol)")
    _check_capacity(vips, lb, bad_lb_keys, problems)
    if "lb.ring_size" not in bad_lb_keys:
        _check_ring_size(vips, lb, problems)


def _check_capacity(vips: Sequence[Vip], lb: LbSection, bad_lb_keys: set[str],
                    problems: list[str]) -> None:
    # Id 0 is reserved in both maps, so a map of N entries holds N - 1 VIPs/backends.
    if "lb.max_vips" not in bad_lb_keys and len(vips) >= lb.max_vips:
        problems.append(f"lb.max_vips: {lb.max_vips} leaves room for {lb.max_vips - 1} VIPs "
                        f"but the config has {len(vips)}; raise it")
    total = sum(len(v.backends) for v in vips)
    if "lb.max_backends" not in bad_lb_keys and total >= lb.max_backends:
        problems.append(f"lb.max_backends: {lb.max_backends} leaves room for "
                        f"{lb.max_backends - 1} VIP/backend pairs but the config has {total}; "
                        f"raise it")


def _check_ring_size(vips: Sequence[Vip], lb: LbSection, problems: list[str]) -> None:
    if not vips:
        return
    largest = max(vips, key=lambda v: len(v.backends))
    need = RING_SLOTS_PER_BACKEND * len(largest.backends)
    if lb.ring_size <= need:
        problems.append(f"lb.ring_size: {lb.ring_size} is too small for vip {fmt(largest.name)} "
                        f"with {len(largest.backends)} backends (needs a prime > {need}, "
                        f"e.g. {next_prime(need)})")
