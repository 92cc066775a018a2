"""xdplb's TOML configuration: parsed into frozen dataclasses, validated completely.

Validation never stops at the first problem: `load_config` collects every problem it can
find and raises one `ConfigError` (lb/errors.py) whose `.problems` lists them, one
line each, naming the key and the VIP/backend, e.g.

    lb.ring_size: 65536 is not prime (nearest primes: 65521, 65537)
    vip "web" backend 10.1.0.300: address: "10.1.0.300" is not an IP address
    unknown key lb.interfac (did you mean "interface"?)

Only what the file alone proves wrong is an error. Whatever depends on the machine (does the
interface exist, which outer source address a backend family gets when `source_v4`/`source_v6`
is absent) is resolved and reported at run time.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import ipaddress
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

from .errors import ConfigError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
PathLike = Union[str, os.PathLike]

XDP_MODES = ("auto", "native", "generic")
ENCAPS = ("ipip", "gue")
LOG_FORMATS = ("console", "json")
PROTOCOLS = ("tcp", "udp")
PROTO_NUMBERS = {"tcp": 6, "udp": 17}
HASHES = ("5tuple", "src_ip")
ALL_DOWN = ("drop", "spread")
HEALTH_TYPES = ("tcp", "http", "none")
BACKEND_STATES = ("active", "drain", "maint")

RING_SLOTS_PER_BACKEND = 100  # ring_size must be a prime > 100 x backends of any VIP
RING_SIZE_MIN = 101
RING_SIZE_MAX = 1 << 24       # 64 MiB of ring per VIP; Maglev build time grows with it
WEIGHT_MAX = 65535
U32_MAX = (1 << 32) - 1
IFNAMSIZ = 16                 # Linux interface names: at most 15 bytes
SUN_PATH_MAX = 107            # Unix socket paths: at most 107 bytes (+ NUL)


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
    flow_insert_limit: int = 0
    bpf_pin_path: str = "/sys/fs/bpf/xdplb"
    control_socket: str = "/run/xdplb/control.sock"
    state_file: str = "/var/lib/xdplb/state.json"
    metrics_listen: Optional[str] = None
    log_format: str = "console"
    keep_datapath_on_exit: bool = False
    max_vips: int = 4096
    max_backends: int = 65536

    @property
    def metrics_address(self) -> Optional[tuple[str, int]]:
        """`metrics_listen` as (host, port), IPv6 brackets removed; None when not set."""
        if self.metrics_listen is None:
            return None
        host, port = _split_host_port(self.metrics_listen)
        return host, int(port)


@dataclass(frozen=True)
class HealthSection:
    """[health] (defaults for every VIP) and, resolved, each VIP's health check.

    In [health], `port` may be None (= each VIP's port); in `Vip.health` it is always set
    (0 only for `type = "none"` on a VIP that listens on any port)."""

    type: str = "tcp"
    port: Optional[int] = None
    path: str = "/"
    expect_status: int = 200
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3


@dataclass(frozen=True)
class Backend:
    address: IPAddress
    weight: int = 1
    state: str = "active"


@dataclass(frozen=True)
class Vip:
    name: str
    address: IPAddress
    port: int                      # 0 = any port
    protocol: str = "tcp"
    hash: str = "5tuple"
    all_down: str = "drop"
    health: HealthSection = field(default_factory=HealthSection)
    backends: tuple[Backend, ...] = ()

    @property
    def proto(self) -> int:
        """IP protocol number (6 or 17)."""
        return PROTO_NUMBERS[self.protocol]

    @property
    def ident(self) -> tuple[IPAddress, int, int]:
        """(address, port, IP protocol number): the data path's key for this VIP."""
        return (self.address, self.port, self.proto)

    @property
    def hash_src_only(self) -> bool:
        return self.hash == "src_ip"

    def backend(self, address: Union[str, IPAddress]) -> Optional[Backend]:
        """The backend with this address (any spelling), or None."""
        try:
            wanted = ipaddress.ip_address(address)
        except ValueError:
            return None
        return next((b for b in self.backends if b.address == wanted), None)


@dataclass(frozen=True)
class Config:
    lb: LbSection
    health: HealthSection
    vips: tuple[Vip, ...]
    source: Optional[Path] = None

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
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError([_read_problem(p, e)]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        problem = f"{_bare(str(p))}: not UTF-8 text (bad byte at offset {e.start})"
        raise ConfigError([problem]) from None
    return parse_config(text, source=p)


def parse_config(text: str, source: Optional[Path] = None) -> Config:
    """Parse and validate TOML text; raise ConfigError listing every problem."""
    try:
        data = tomllib.loads(text.lstrip("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_syntax_problem(e)]) from None
    except RecursionError:
        raise ConfigError(["syntax error: values nested too deeply"]) from None
    problems: list[str] = []
    config = _build_config(data, source, problems)
    if problems or config is None:
        raise ConfigError(problems or ["configuration is invalid"])
    return config


def check(path: PathLike) -> tuple[bool, list[str]]:
    """For `xdplb check`: (True, ["ok: N vips, M backends"]) or (False, problems)."""
    try:
        config = load_config(path)
    except ConfigError as e:
        return False, e.problems
    return True, [f"ok: {len(config.vips)} vips, {config.backend_count} backends"]


# --- reading one table -------------------------------------------------------------------

_MISSING: Any = object()

_KIND_ARTICLES = {"string": "a string", "integer": "an integer", "number": "a number",
                  "boolean": "a boolean", "table": "a table", "array": "an array"}


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    if isinstance(value, datetime.datetime):
        return "datetime"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return "time"
    return type(value).__name__


def _is_kind(value: Any, kind: str) -> bool:
    actual = _kind_of(value)
    return actual == kind or (kind == "number" and actual in ("integer", "float"))


def _fmt(value: Any) -> str:
    """A value as it would appear in TOML, on one line."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class _Table:
    """One TOML table: typed reads that record problems under a label (`where`: the VIP or
    backend, `prefix`: the key path inside it), and the set of keys it knows."""

    def __init__(self, data: dict, problems: list[str], where: str = "", prefix: str = ""):
        self.data = data
        self.problems = problems
        self.where = where
        self.prefix = prefix
        self.known: set[str] = set()

    def _lead(self) -> str:
        return f"{self.where}: " if self.where else ""

    def report(self, key: str, message: str) -> None:
        self.problems.append(f"{self._lead()}{self.prefix}{key}: {message}")

    def note(self, message: str) -> None:
        self.problems.append(f"{self._lead()}{message}")

    def raw(self, key: str, kind: str, required: bool = False) -> Any:
        """The value if present and of the right kind, else _MISSING (reported)."""
        self.known.add(key)
        if key not in self.data:
            if required:
                self.report(key, "required key is missing")
            return _MISSING
        value = self.data[key]
        if not _is_kind(value, kind):
            self.report(key, f"expected {_KIND_ARTICLES[kind]}, got {_kind_of(value)}")
            return _MISSING
        return value

    def string(self, key: str, default: Optional[str] = None, required: bool = False
               ) -> Optional[str]:
        value = self.raw(key, "string", required)
        if value is _MISSING:
            return default
        if "\0" in value:
            self.report(key, "contains a NUL character")
            return default
        return value

    def integer(self, key: str, default: Optional[int], lo: int, hi: Optional[int] = None,
                required: bool = False) -> Optional[int]:
        value = self.raw(key, "integer", required)
        if value is _MISSING:
            return default
        if hi is None and value < lo:
            self.report(key, f"{value} must be at least {lo}")
            return default
        if hi is not None and not lo <= value <= hi:
            self.report(key, f"{value} out of range {lo}..{hi}")
            return default
        return value

    def positive(self, key: str, default: float) -> float:
        """A finite number > 0 (integers accepted), returned as float."""
        value = self.raw(key, "number")
        if value is _MISSING:
            return default
        if not math.isfinite(value) or value <= 0:
            self.report(key, f"{_fmt(value)} must be a positive number of seconds")
            return default
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, "boolean")
        return default if value is _MISSING else value

    def choice(self, key: str, default: str, allowed: Sequence[str]) -> str:
        value = self.raw(key, "string")
        if value is _MISSING:
            return default
        if value not in allowed:
            self.report(key, f"{_fmt(value)} is not one of: {', '.join(allowed)}")
            return default
        return value

    def address(self, key: str, required: bool = False, version: Optional[int] = None
                ) -> Optional[IPAddress]:
        value = self.raw(key, "string", required)
        if value is _MISSING:
            return None
        problem, addr = _parse_address(value, version)
        if problem:
            self.report(key, problem)
        return addr

    def table(self, key: str) -> Optional[dict]:
        """A sub-table, or None when absent or not a table (reported)."""
        value = self.raw(key, "table")
        return None if value is _MISSING else value

    def tables(self, key: str, spelled: str) -> Optional[list]:
        """An array of tables ([[spelled]]), or None when absent or malformed (reported)."""
        self.known.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, dict):
            self.report(key, f"expected an array of tables, got a table (write [[{spelled}]], "
                             f"not [{spelled}])")
            return None
        if not isinstance(value, list):
            self.report(key, f"expected an array of tables ([[{spelled}]]), got "
                             f"{_kind_of(value)}")
            return None
        return value

    def finish(self) -> None:
        """Report every key this table was not asked about."""
        for key in self.data:
            if key not in self.known:
                self.note(f"unknown key {self.prefix}{_key(key)}{_suggest(key, self.known)}")


_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _key(key: str) -> str:
    """A key as TOML would spell it: bare when possible, else quoted."""
    return key if _BARE.fullmatch(key) else _fmt(key)


def _bare(text: str) -> str:
    """Text for a label: as is when printable without spaces, else quoted."""
    return text if text.isprintable() and not any(c.isspace() for c in text) else _fmt(text)


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


# --- values ------------------------------------------------------------------------------

def _parse_address(text: str, version: Optional[int] = None
                   ) -> tuple[Optional[str], Optional[IPAddress]]:
    """(problem, address): exactly one of them is None."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        want = f"an IPv{version}" if version else "an IP"
        return f"{_fmt(text)} is not {want} address", None
    if version and addr.version != version:
        return (f"{_fmt(text)} is an IPv{addr.version} address, expected "
                f"IPv{version}"), None
    if getattr(addr, "scope_id", None):
        return f"{_fmt(text)}: a zone index (%...) is not allowed here", None
    if addr.is_unspecified or addr.is_multicast or addr == ipaddress.IPv4Address(U32_MAX):
        return f"{_fmt(text)} is not a usable unicast address", None
    return None, addr


_IFNAME_BAD = re.compile(r"[/:\s]")


def _ifname_problem(name: str) -> Optional[str]:
    if not name:
        return "must not be empty"
    if len(name.encode()) >= IFNAMSIZ or _IFNAME_BAD.search(name) or name in (".", ".."):
        return (f"{_fmt(name)} is not a valid interface name (at most {IFNAMSIZ - 1} "
                f"characters, no '/', ':' or spaces)")
    return None


def _split_host_port(text: str) -> tuple[str, str]:
    """'host:port' or '[v6]:port' -> (host, port text); ValueError when not of that form."""
    m = re.fullmatch(r"\[([^\[\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not m:
        raise ValueError(text)
    return (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _listen_problem(text: str) -> Optional[str]:
    form = f"{_fmt(text)} is not of the form HOST:PORT (e.g. 127.0.0.1:9733 or [::1]:9733)"
    try:
        host, port = _split_host_port(text)
    except ValueError:
        return form
    if not 1 <= int(port) <= 65535:
        return f"{_fmt(text)}: port {int(port)} out of range 1..65535"
    bracketed = text.startswith("[")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if bracketed or not _HOSTNAME.fullmatch(host):
            return f"{_fmt(text)}: {_fmt(host)} is neither an IP address nor a host name"
        return None
    if (addr.version == 6) != bracketed:
        return form
    return None


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0 or n % 3 == 0:
        return n in (2, 3)
    f = 5
    while f * f <= n:
        if n % f == 0 or n % (f + 2) == 0:
            return False
        f += 6
    return True


def _next_prime(n: int) -> int:
    """The smallest prime > n."""
    n += 1
    while not _is_prime(n):
        n += 1
    return n


def _prev_prime(n: int) -> Optional[int]:
    """The largest prime < n, or None."""
    n -= 1
    while n >= 2 and not _is_prime(n):
        n -= 1
    return n if n >= 2 else None


# --- sections ----------------------------------------------------------------------------

def _build_config(data: dict, source: Optional[Path], problems: list[str]
                  ) -> Optional[Config]:
    """The Config, or None when `problems` received anything."""
    top = _Table(data, problems)
    lb = _parse_lb(_Table(top.table("lb") or {}, problems, prefix="lb."))
    bad_lb_keys = {p.split(":", 1)[0] for p in problems}
    health = _parse_health_defaults(_Table(top.table("health") or {}, problems,
                                           prefix="health."))
    vips = _parse_vips(top.tables("vip", "vip") or [], health, problems)
    top.finish()
    _check_vips_against_lb(vips, lb, bad_lb_keys, problems)
    if problems:
        return None
    return Config(lb=lb, health=health, vips=tuple(vips), source=source)


def _parse_lb(t: _Table) -> LbSection:
    """[lb]; an invalid value is reported and replaced by its default (interface: "")."""
    d = LbSection(interface="")
    interface = _interface(t, "interface", required=True)
    egress = _interface(t, "egress_interface")
    values = dict(
        egress_interface=egress,
        xdp_mode=t.choice("xdp_mode", d.xdp_mode, XDP_MODES),
        encap=t.choice("encap", d.encap, ENCAPS),
        gue_port=t.integer("gue_port", d.gue_port, 1, 65535),
        source_v4=t.address("source_v4", version=4),
        source_v6=t.address("source_v6", version=6),
        ring_size=_ring_size(t, d.ring_size),
        flow_table_size=t.integer("flow_table_size", d.flow_table_size, 1, U32_MAX),
        flow_insert_limit=t.integer("flow_insert_limit", d.flow_insert_limit, 0, U32_MAX),
        bpf_pin_path=_bpf_pin_path(t, d.bpf_pin_path),
        control_socket=_socket_path(t, "control_socket", d.control_socket),
        state_file=_path(t, "state_file", d.state_file),
        metrics_listen=_metrics_listen(t),
        log_format=t.choice("log_format", d.log_format, LOG_FORMATS),
        keep_datapath_on_exit=t.boolean("keep_datapath_on_exit", d.keep_datapath_on_exit),
        max_vips=t.integer("max_vips", d.max_vips, 2, 1 << 20),
        max_backends=t.integer("max_backends", d.max_backends, 2, 1 << 24),
    )
    t.finish()
    return LbSection(interface=interface or "", **values)


def _interface(t: _Table, key: str, required: bool = False) -> Optional[str]:
    name = t.string(key, required=required)
    if name is None:
        return None
    problem = _ifname_problem(name)
    if problem:
        t.report(key, problem)
        return None
    return name


def _ring_size(t: _Table, default: int) -> int:
    size = t.integer("ring_size", None, RING_SIZE_MIN, RING_SIZE_MAX)
    if size is None:
        return default
    if not _is_prime(size):
        t.report("ring_size", f"{size} is not prime (nearest primes: "
                              f"{_prev_prime(size)}, {_next_prime(size)})")
        return default
    return size


def _path(t: _Table, key: str, default: str) -> str:
    path = t.string(key, default)
    if path == "":
        t.report(key, "must not be empty")
        return default
    return path


def _bpf_pin_path(t: _Table, default: str) -> str:
    path = _path(t, "bpf_pin_path", default)
    if not path.startswith("/"):
        t.report("bpf_pin_path", f"{_fmt(path)} must be an absolute path on a bpffs mount "
                                 f"(e.g. /sys/fs/bpf/xdplb)")
        return default
    return path


def _socket_path(t: _Table, key: str, default: str) -> str:
    path = _path(t, key, default)
    if len(path.encode()) > SUN_PATH_MAX:
        t.report(key, f"path is {len(path.encode())} bytes long; a Unix socket path holds "
                      f"at most {SUN_PATH_MAX}")
        return default
    return path


def _metrics_listen(t: _Table) -> Optional[str]:
    text = t.string("metrics_listen")
    if text is None:
        return None
    problem = _listen_problem(text)
    if problem:
        t.report("metrics_listen", problem)
        return None
    return text


# --- health ------------------------------------------------------------------------------

def _read_health(t: _Table) -> dict[str, Any]:
    """The health keys present (and valid) in one table, checked one by one."""
    values = dict(
        type=t.choice("type", _MISSING, HEALTH_TYPES),
        port=t.integer("port", _MISSING, 1, 65535),
        path=_http_path(t),
        expect_status=t.integer("expect_status", _MISSING, 100, 599),
        interval=t.positive("interval", _MISSING),
        timeout=t.positive("timeout", _MISSING),
        rise=t.integer("rise", _MISSING, 1, 1000),
        fall=t.integer("fall", _MISSING, 1, 1000),
    )
    t.finish()
    return {k: v for k, v in values.items() if v is not _MISSING}


def _http_path(t: _Table) -> Any:
    path = t.string("path", _MISSING)
    if path is _MISSING:
        return _MISSING
    if not path.startswith("/") or any(c.isspace() or ord(c) < 32 or ord(c) == 127
                                        for c in path):
        t.report("path", f"{_fmt(path)} must start with '/' and contain no spaces or "
                         f"control characters")
        return _MISSING
    return path


def _timing_problem(h: HealthSection) -> Optional[str]:
    if h.timeout > h.interval:
        return f"{_fmt(h.timeout)} exceeds interval {_fmt(h.interval)}"
    return None


def _parse_health_defaults(t: _Table) -> HealthSection:
    health = HealthSection(**_read_health(t))
    problem = _timing_problem(health)
    if problem:
        t.report("timeout", problem)
    return health


def _resolve_health(t: _Table, base: HealthSection, vip_port: Optional[int]) -> HealthSection:
    """A VIP's [vip.health] (table `t`, possibly empty) merged over [health]."""
    own = _read_health(t)
    health = dataclasses.replace(base, **own)
    problem = _timing_problem(health)
    if problem and ("interval" in own or "timeout" in own):  # else [health] reported it
        t.report("timeout", problem)
    if health.port is None:
        if vip_port == 0 and health.type != "none":
            t.report("port", f"required: the VIP takes any port (port = 0), so its "
                             f"{health.type} check needs an explicit port")
        health = dataclasses.replace(health, port=vip_port or 0)
    return health


# --- VIPs and backends -------------------------------------------------------------------

def _vip_label(data: Any, index: int) -> str:
    name = data.get("name") if isinstance(data, dict) else None
    return f"vip {_fmt(name)}" if isinstance(name, str) and name else f"vip #{index}"


def _parse_vips(items: list, health: HealthSection, problems: list[str]) -> list[Vip]:
    vips: list[Vip] = []
    for index, item in enumerate(items, 1):
        label = _vip_label(item, index)
        if not isinstance(item, dict):
            problems.append(f"{label}: expected a table ([[vip]]), got {_kind_of(item)}")
            continue
        vip = _parse_vip(_Table(item, problems, where=label), health)
        if vip is not None:
            vips.append(vip)
    return vips


def _parse_vip(t: _Table, base_health: HealthSection) -> Optional[Vip]:
    name = t.string("name", required=True)
    if name is not None and (not name.strip() or any(ord(c) < 32 for c in name)):
        t.report("name", "must be non-empty text without control characters")
        name = None
    address = t.address("address", required=True)
    port = t.integer("port", None, 0, 65535, required=True)
    protocol = t.choice("protocol", "tcp", PROTOCOLS)
    hash_ = t.choice("hash", "5tuple", HASHES)
    all_down = t.choice("all_down", "drop", ALL_DOWN)
    health_table = _Table(t.table("health") or {}, t.problems, where=t.where, prefix="health.")
    health = _resolve_health(health_table, base_health, port)
    backends = _parse_backends(t)
    t.finish()
    if name is None or address is None or port is None or backends is None:
        return None
    return Vip(name=name, address=address, port=port, protocol=protocol, hash=hash_,
               all_down=all_down, health=health, backends=tuple(backends))


def _parse_backends(t: _Table) -> Optional[list[Backend]]:
    """The VIP's backends, or None when any of them is invalid."""
    items = t.tables("backend", "vip.backend")
    if items is None and "backend" in t.data:
        return None
    if not items:
        t.note("no backends (add at least one [[vip.backend]] with an address)")
        return None
    backends: list[Optional[Backend]] = []
    for index, item in enumerate(items, 1):
        label = _backend_label(t.where, item, index)
        if not isinstance(item, dict):
            t.problems.append(f"{label}: expected a table ([[vip.backend]]), got "
                              f"{_kind_of(item)}")
            backends.append(None)
            continue
        backends.append(_parse_backend(_Table(item, t.problems, where=label)))
    _check_duplicate_backends(t, backends)
    return None if None in backends else backends  # type: ignore[return-value]


def _backend_label(vip_label: str, data: Any, index: int) -> str:
    address = data.get("address") if isinstance(data, dict) else None
    return (f"{vip_label} backend {_bare(address)}" if isinstance(address, str) and address
            else f"{vip_label} backend #{index}")


def _parse_backend(t: _Table) -> Optional[Backend]:
    address = t.address("address", required=True)
    weight = t.integer("weight", 1, 0, WEIGHT_MAX)
    state = t.choice("state", "active", BACKEND_STATES)
    t.finish()
    return None if address is None else Backend(address=address, weight=weight, state=state)


def _check_duplicate_backends(t: _Table, backends: Sequence[Optional[Backend]]) -> None:
    seen: dict[IPAddress, int] = {}
    for index, backend in enumerate(backends, 1):
        if backend is None:
            continue
        first = seen.setdefault(backend.address, index)
        if first != index:
            t.note(f"backend {backend.address}: listed twice (backends #{first} and #{index})")


def _check_vips_against_lb(vips: Sequence[Vip], lb: LbSection, bad_lb_keys: set[str],
                           problems: list[str]) -> None:
    """What needs every VIP at once: uniqueness, map sizes, ring size (each skipped when
    its [lb] key was itself invalid, so a default nobody wrote is never blamed)."""
    names: dict[str, int] = {}
    idents: dict[tuple, Vip] = {}
    for index, vip in enumerate(vips, 1):
        first = names.setdefault(vip.name, index)
        if first != index:
            problems.append(f"vip {_fmt(vip.name)}: duplicate name (vips #{first} and #{index})")
        other = idents.setdefault(vip.ident, vip)
        if other is not vip:
            problems.append(f"vip {_fmt(vip.name)}: duplicate of vip {_fmt(other.name)} "
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
        problems.append(f"lb.ring_size: {lb.ring_size} is too small for vip {_fmt(largest.name)} "
                        f"with {len(largest.backends)} backends (needs a prime > {need}, "
                        f"e.g. {_next_prime(need)})")


# --- file-level problems -----------------------------------------------------------------

def _read_problem(p: Path, e: OSError) -> str:
    path = _bare(str(p))
    if isinstance(e, FileNotFoundError):
        return f"{path}: no such file"
    if isinstance(e, IsADirectoryError):
        return f"{path}: is a directory, not a config file"
    if isinstance(e, PermissionError):
        return f"{path}: permission denied (cannot read the config)"
    return f"{path}: cannot read: {e.strerror or e}"


_AT_LINE = re.compile(r"^(.*?)\s*\(at line (\d+), column (\d+)\)\s*$", re.S)
_AT_END = re.compile(r"^(.*?)\s*\(at end of document\)\s*$", re.S)


def _syntax_problem(e: Exception) -> str:
    message = str(e).strip()
    m = _AT_LINE.match(message)
    if m:
        return f"syntax error at line {m.group(2)}, column {m.group(3)}: {_lower1(m.group(1))}"
    m = _AT_END.match(message)
    if m:
        return f"syntax error at end of file: {_lower1(m.group(1))}"
    return f"syntax error: {message}"


def _lower1(text: str) -> str:
    return text[:1].lower() + text[1:]
