"""Network-namespace plumbing for tests and the lab: named namespaces, veth pairs,
bridges, addresses, routes, sysctls, offloads, XDP attachment, and running code or
commands inside a namespace. Links are driven over rtnetlink with pyroute2 (no `ip`).

Two ways into a namespace are used:

* `Netns.entered()` moves *the calling thread* into the namespace for the duration of a
  `with` block (setns(2) on the thread) and back. Sockets, netlink sockets and BPF
  syscalls that resolve an ifindex (bpf_xdp_attach, devmap updates) made inside the block
  stay bound to that namespace. Cheap; used by almost everything below.
* `Netns.run(fn)` forks, enters the namespace in the child and returns fn's (picklable)
  result; `Netns.spawn(argv)` starts a command under `nsenter --net=...`. Unlike
  `ip netns exec`, neither remounts /sys, so bpffs stays visible.

Every failure raises NetnsError (an OSError: .errno set) saying what failed.

    with Netns("lb-test") as a, Netns("lb-peer") as b:
        add_veth("a0", a, "b0", b)
        a.add_address("a0", "10.0.0.1/24")
        b.add_address("b0", "10.0.0.2/24")
        print(b.run(socket.gethostname))
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import fcntl
import ipaddress
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import time
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_IFA_F_NODAD = 0x02
_SIOCETHTOOL = 0x8946
_ETHTOOL_GTXCSUM = 0x16
_ETHTOOL_STXCSUM = 0x17

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    """A namespace operation failed; str() names the operation and the cause."""

    def __init__(self, err: int, what: str):
        super().__init__(err, os.strerror(err) if err else "failed")
        self.what = what

    def __str__(self) -> str:
        return f"{self.what}: {self.strerror}"


NsLike = Union["Netns", str, None]  # None: the namespace the caller runs in


def _ns_name(ns: NsLike) -> Optional[str]:
    return ns.name if isinstance(ns, Netns) else ns


def ns_path(name: str) -> str:
    return name if "/" in name else os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.ismount(ns_path(name))


def list_namespaces() -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if exists(n))
    except FileNotFoundError:
        return []


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise NetnsError(ctypes.get_errno(), what)


def _make_rundir_shared() -> None:
    """As iproute2 does: /run/netns is a shared mount, so namespace bind mounts made
    here propagate to mount namespaces created later (nsenter, containers)."""
    os.makedirs(NETNS_DIR, exist_ok=True)
    d = NETNS_DIR.encode()
    if _libc.mount(b"none", d, None, _MS_SHARED | _MS_REC, None) == 0:
        return
    if _libc.mount(d, d, b"none", _MS_BIND | _MS_REC, None) != 0:
        raise NetnsError(ctypes.get_errno(), f"bind-mounting {NETNS_DIR} on itself")
    if _libc.mount(b"none", d, None, _MS_SHARED | _MS_REC, None) != 0:
        raise NetnsError(ctypes.get_errno(), f"making {NETNS_DIR} a shared mount")


def create(name: str) -> bool:
    """Create the named namespace (with lo up) unless it exists. True if created."""
    if exists(name):
        return False
    if "/" in name or not name:
        raise NetnsError(_errno.EINVAL, f"creating netns {name!r}: not a plain name")
    _make_rundir_shared()
    path = ns_path(name)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o444))
    except OSError as e:
        raise NetnsError(e.errno, f"creating mount point {path}") from None
    # unshare() moves only this thread into the new namespace; it is bound to the path,
    # then the thread goes back (no fork needed).
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            os.unlink(path)
            raise NetnsError(err, f"creating netns {name} (unshare)")
        try:
            if _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", _MS_BIND,
                           None) != 0:
                err = ctypes.get_errno()
                os.unlink(path)
                raise NetnsError(err, f"binding netns {name} to {path}")
        finally:
            _setns(back, f"returning from new netns {name}")
    finally:
        os.close(back)
    Netns(name, create=False).set_link("lo", up=True)
    return True


def remove(name: str) -> bool:
    """Unmount and delete the named namespace if it exists; its interfaces go away with
    it once nothing else holds it. True if it existed."""
    path = ns_path(name)
    if not os.path.exists(path):
        return False
    if os.path.ismount(path) and _libc.umount2(path.encode(), _MNT_DETACH) != 0:
        raise NetnsError(ctypes.get_errno(), f"unmounting netns {name}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise NetnsError(e.errno, f"removing {path}") from None
    return True


_create = create


@contextlib.contextmanager
def entered(ns: NsLike) -> Iterator[None]:
    """Run the block with the calling thread in namespace `ns` (None: stay)."""
    name = _ns_name(ns)
    if name is None:
        yield
        return
    try:
        target = os.open(ns_path(name), os.O_RDONLY)
    except OSError as e:
        raise NetnsError(e.errno, f"opening netns {name}") from None
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target, f"entering netns {name}")
        try:
            yield
        finally:
            _setns(back, f"leaving netns {name}")
    finally:
        os.close(target)
        os.close(back)


class _nl:
    """`with _nl("doing X"):` turns pyroute2 / OS errors into NetnsError naming X."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, tp, exc, tb):
        if exc is None or isinstance(exc, NetnsError):
            return False
        if isinstance(exc, NetlinkError):
            raise NetnsError(exc.code, self.what) from None
        if isinstance(exc, OSError):
            raise NetnsError(exc.errno or _errno.EIO, self.what) from None
        return False


@contextlib.contextmanager
def _ipr_in(name: Optional[str]) -> Iterator[IPRoute]:
    with entered(name):
        with _nl(f"opening rtnetlink in netns {name or 'current'}"):
            ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, ifname: str, name: Optional[str]) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(_errno.ENODEV, f"interface {ifname} not found in netns "
                         f"{name or 'current'}")
    return found[0]


def _sysctl_path(key: str) -> str:
    """"net.ipv4.ip_forward" or "net/ipv4/conf/eth0.5/rp_filter" (slashes when a part
    holds a dot)."""
    return "/proc/sys/" + (key.lstrip("/") if "/" in key else key.replace(".", "/"))


def _mac_str(mac: Union[bytes, str]) -> str:
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise ValueError(f"MAC of {len(mac)} bytes")
        return ":".join(f"{b:02x}" for b in mac)
    return mac


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(p, 16) for p in mac.split(":"))


class Netns:
    """A named network namespace, created (if missing) at construction unless
    create=False. As a context manager it is removed on exit unless owned=False."""

    def __init__(self, name: str, create: bool = True, owned: bool = True):
        self.name = name
        self.owned = owned
        if create:
            _create(name)

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def path(self) -> str:
        return ns_path(self.name)

    def remove(self) -> bool:
        return remove(self.name)

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.remove()

    def entered(self) -> contextlib.AbstractContextManager:
        """`with ns.entered():` the calling thread works inside this namespace."""
        return entered(self.name)

    def ipr(self) -> contextlib.AbstractContextManager:
        """`with ns.ipr() as ipr:` an rtnetlink socket (pyroute2 IPRoute) bound to this
        namespace."""
        return _ipr_in(self.name)

    # --- links -----------------------------------------------------------------------
    def _index(self, ipr: IPRoute, ifname: str) -> int:
        return _index(ipr, ifname, self.name)

    def ifindex(self, ifname: str) -> int:
        with self.ipr() as ipr, _nl(f"looking up {ifname} in netns {self.name}"):
            return self._index(ipr, ifname)

    def mac(self, ifname: str) -> bytes:
        with self.ipr() as ipr, _nl(f"reading MAC of {ifname} in netns {self.name}"):
            link = ipr.get_links(self._index(ipr, ifname))[0]
            return _mac_bytes(link.get_attr("IFLA_ADDRESS"))

    def links(self) -> list[str]:
        with self.ipr() as ipr, _nl(f"listing links of netns {self.name}"):
            return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]

    def set_link(self, ifname: str, *, mac: Union[bytes, str, None] = None,
                 mtu: Optional[int] = None, up: Optional[bool] = None,
                 master: Optional[str] = None) -> None:
        """Set MAC / MTU / bridge master, then bring the link up or down."""
        with self.ipr() as ipr, _nl(f"configuring {ifname} in netns {self.name}"):
            idx = self._index(ipr, ifname)
            attrs: dict[str, Any] = {}
            if mac is not None:
                attrs["address"] = _mac_str(mac)
            if mtu is not None:
                attrs["mtu"] = mtu
            if master is not None:
                attrs["master"] = self._index(ipr, master)
            if attrs:
                ipr.link("set", index=idx, **attrs)
            if up is not None:
                ipr.link("set", index=idx, state="up" if up else "down")

    def add_bridge(self, name: str, up: bool = True) -> int:
        """A bridge without STP (ports forward at once). Returns its ifindex."""
        with self.ipr() as ipr, _nl(f"creating bridge {name} in netns {self.name}"):
            if not ipr.link_lookup(ifname=name):
                ipr.link("add", ifname=name, kind="bridge", br_stp_state=0,
                         br_forward_delay=0)
            idx = self._index(ipr, name)
            if up:
                ipr.link("set", index=idx, state="up")
            return idx

    def delete_link(self, ifname: str) -> bool:
        with self.ipr() as ipr, _nl(f"deleting {ifname} in netns {self.name}"):
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return False
            ipr.link("del", index=found[0])
            return True

    # --- addresses, routes, neighbours ----------------------------------------------
    def add_address(self, ifname: str, address: str) -> None:
        """"10.0.0.1/24" or "fd00::1/64" (IPv6 without duplicate address detection, so
        it is usable at once). Adding an address already there is not an error."""
        iface = ipaddress.ip_interface(address)
        with self.ipr() as ipr, _nl(f"adding {address} to {ifname} in netns {self.name}"):
            idx = self._index(ipr, ifname)
            kw: dict[str, Any] = {}
            if iface.version == 6:
                kw["flags"] = _IFA_F_NODAD
            try:
                ipr.addr("add", index=idx, address=str(iface.ip),
                         prefixlen=iface.network.prefixlen, **kw)
            except NetlinkError as e:
                if e.code != _errno.EEXIST:
                    raise

    def add_route(self, dst: str, *, via: Optional[str] = None, dev: Optional[str] = None,
                  src: Optional[str] = None, onlink: bool = False,
                  family: Optional[int] = None) -> None:
        """dst is a prefix or "default" (family from `via`/`src`, or `family`, else v4).
        Replaces an existing route to the same prefix."""
        with self.ipr() as ipr, _nl(f"adding route {dst} in netns {self.name}"):
            fam = family
            for a in (via, src):
                if fam is None and a is not None:
                    fam = socket.AF_INET6 if ipaddress.ip_address(a).version == 6 \
                        else socket.AF_INET
            kw: dict[str, Any] = {}
            if dst == "default":
                fam = fam or socket.AF_INET
                kw["dst"] = "::/0" if fam == socket.AF_INET6 else "0.0.0.0/0"
            else:
                net = ipaddress.ip_network(dst, strict=False)
                fam = socket.AF_INET6 if net.version == 6 else socket.AF_INET
                kw["dst"] = str(net)
            kw["family"] = fam
            if via is not None:
                kw["gateway"] = via
            if dev is not None:
                kw["oif"] = self._index(ipr, dev)
            if src is not None:
                kw["prefsrc"] = src
            if onlink:
                kw["flags"] = 4  # RTNH_F_ONLINK
            ipr.route("replace", **kw)

    def add_neighbor(self, ifname: str, address: str, mac: Union[bytes, str]) -> None:
        """A permanent ARP / NDP entry."""
        with self.ipr() as ipr, _nl(f"adding neighbour {address} on {ifname} in netns "
                                    f"{self.name}"):
            fam = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 \
                else socket.AF_INET
            ipr.neigh("replace", ifindex=self._index(ipr, ifname), dst=address,
                      lladdr=_mac_str(mac), family=fam, state=0x80)  # NUD_PERMANENT

    # --- sysctls and offloads ---------------------------------------------------------
    def sysctl(self, key: str, value: Union[int, str]) -> None:
        """sysctl("net.ipv4.ip_forward", 1); dots or slashes; only net.* differs per
        namespace."""
        path = _sysctl_path(key)
        with self.entered():
            try:
                with open(path, "w") as f:
                    f.write(f"{value}\n")
            except OSError as e:
                raise NetnsError(e.errno, f"setting {key}={value} in netns {self.name}") \
                    from None

    def sysctl_get(self, key: str) -> str:
        path = _sysctl_path(key)
        with self.entered():
            try:
                with open(path) as f:
                    return f.read().strip()
            except OSError as e:
                raise NetnsError(e.errno, f"reading {key} in netns {self.name}") from None

    def router(self, forwarding: bool = True) -> None:
        """IPv4/IPv6 forwarding on, rp_filter off, accept_local on: a namespace that
        forwards packets whose sources it also owns (DSR labs) without dropping them."""
        v = 1 if forwarding else 0
        self.sysctl("net.ipv4.ip_forward", v)
        self.sysctl("net.ipv6.conf.all.forwarding", v)
        self.relaxed()

    def relaxed(self, ifnames: Sequence[str] = ()) -> None:
        """rp_filter 0 and accept_local 1 (all, default and the given interfaces)."""
        for dev in ("all", "default", *ifnames):
            self.sysctl(f"net/ipv4/conf/{dev}/rp_filter", 0)
            self.sysctl(f"net/ipv4/conf/{dev}/accept_local", 1)

    def _ethtool_value(self, ifname: str, cmd: int, data: int = 0) -> int:
        buf = ctypes.create_string_buffer(struct.pack("II", cmd, data))
        ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(buf)).ljust(40, b"\0")
        with self.entered():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifr)
        except OSError as e:
            raise NetnsError(e.errno, f"ethtool command {cmd:#x} on {ifname} in netns "
                             f"{self.name}") from None
        finally:
            s.close()
        return struct.unpack("II", buf.raw[:8])[1]

    def set_tx_checksum(self, ifname: str, on: bool) -> None:
        """`ethtool -K IF tx on|off`. Off makes the stack complete TCP/UDP checksums in
        software: needed on a veth whose frames are handled by XDP further on, since XDP
        frames carry no 'checksum still partial' mark and would leave with a bad one."""
        self._ethtool_value(ifname, _ETHTOOL_STXCSUM, 1 if on else 0)

    def tx_checksum(self, ifname: str) -> bool:
        return bool(self._ethtool_value(ifname, _ETHTOOL_GTXCSUM))

    # --- XDP ------------------------------------------------------------------------
    def xdp_attach(self, ifname: str, prog_fd: int, mode: str = "native") -> int:
        """Attach an XDP program to an interface of this namespace; returns its ifindex.
        (bpf_xdp_attach resolves the ifindex in the caller's namespace.)"""
        from .native import xdp_attach

        idx = self.ifindex(ifname)
        with self.entered():
            xdp_attach(idx, prog_fd, mode)
        return idx

    def xdp_detach(self, ifname: str, mode: str = "native") -> None:
        from .native import xdp_detach

        idx = self.ifindex(ifname)
        with self.entered():
            xdp_detach(idx, mode)

    def xdp_query(self, ifname: str) -> dict:
        from .native import xdp_query

        idx = self.ifindex(ifname)
        with self.entered():
            return xdp_query(idx)

    # --- code and commands inside ---------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 30.0,
            **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in a forked child inside this namespace; returns its
        result (must pickle) or raises its exception (as NetnsError if it won't pickle)."""
        return run_in(self.name, fn, *args, timeout=timeout, **kwargs)

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start argv inside this namespace (nsenter --net; /sys and bpffs stay)."""
        return spawn_in(self.name, argv, **popen_kwargs)

    def check_output(self, argv: Sequence[str], timeout: float = 30.0) -> str:
        p = self.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise NetnsError(_errno.ETIMEDOUT, f"{argv[0]} in netns {self.name}") from None
        if p.returncode != 0:
            raise NetnsError(_errno.EIO, f"{' '.join(argv)} in netns {self.name} exited "
                             f"{p.returncode}: {err.strip()[-300:]}")
        return out

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:
        """A socket living in this namespace, usable from any thread afterwards."""
        with self.entered():
            return socket.socket(family, type, proto)


def add_veth(name_a: str, ns_a: NsLike, name_b: str, ns_b: NsLike, *,
             mac_a: Union[bytes, str, None] = None, mac_b: Union[bytes, str, None] = None,
             mtu: Optional[int] = None, up: bool = True) -> tuple[int, int]:
    """A veth pair with end name_a in ns_a and name_b in ns_b (None: the caller's
    namespace). Returns (ifindex_a, ifindex_b), each valid in its own namespace."""
    a, b = _ns_name(ns_a), _ns_name(ns_b)
    what = f"creating veth {name_a}@{a or 'current'} -- {name_b}@{b or 'current'}"
    peer: dict[str, Any] = {"ifname": name_b}
    if mac_b is not None:
        peer["address"] = _mac_str(mac_b)
    if mtu is not None:
        peer["mtu"] = mtu
    kw: dict[str, Any] = {"ifname": name_a, "kind": "veth", "peer": peer}
    if mac_a is not None:
        kw["address"] = _mac_str(mac_a)
    if mtu is not None:
        kw["mtu"] = mtu
    bfd = None
    if b != a:  # opened here, before entering a (None = the caller's namespace)
        try:
            bfd = os.open(ns_path(b) if b else "/proc/thread-self/ns/net", os.O_RDONLY)
        except OSError as e:
            raise NetnsError(e.errno, f"{what}: opening netns {b}") from None
        peer["net_ns_fd"] = bfd
    try:
        with _ipr_in(a) as ipr, _nl(what):
            ipr.link("add", **kw)
    finally:
        if bfd is not None:
            os.close(bfd)
    idx = []
    for ns, ifname in ((a, name_a), (b, name_b)):
        with _ipr_in(ns) as ipr, _nl(f"{what}: bringing {ifname} up"):
            i = _index(ipr, ifname, ns)
            if up:
                ipr.link("set", index=i, state="up")
            idx.append(i)
    return idx[0], idx[1]


# --- running things inside a namespace ------------------------------------------------
def run_in(ns: NsLike, fn: Callable[..., Any], *args: Any, timeout: float = 30.0,
           **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a forked child whose network namespace is `ns`. The
    result (or the exception) comes back pickled; a hung child is killed after
    `timeout` seconds."""
    name = _ns_name(ns)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        code = 0
        try:
            os.close(rfd)
            if name is not None:
                fd = os.open(ns_path(name), os.O_RDONLY)
                _setns(fd, f"entering netns {name}")
                os.close(fd)
            fname = getattr(fn, "__name__", repr(fn))
            try:
                ok, value = True, fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - shipped to the parent
                ok, value = False, e
            try:
                payload = pickle.dumps((ok, value))
            except Exception as e:  # noqa: BLE001
                what = "result" if ok else f"exception {value!r}"
                payload = pickle.dumps((False, NetnsError(
                    _errno.EIO, f"{fname} in netns {name}: its {what} cannot be sent back "
                    f"({e})")))
            view = memoryview(payload)
            while view:
                view = view[os.write(wfd, view):]
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise NetnsError(_errno.ETIMEDOUT,
                                 f"{getattr(fn, '__name__', fn)} in netns {name} ran over "
                                 f"{timeout}s")
            ready, _, _ = select.select([rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        raise NetnsError(_errno.EIO, f"{getattr(fn, '__name__', fn)} in netns {name}: child "
                         f"died (wait status {status:#x})")
    ok, value = pickle.loads(data)
    if ok:
        return value
    raise value


def spawn_in(ns: NsLike, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen(argv) inside `ns` through nsenter --net (no /sys remount)."""
    name = _ns_name(ns)
    cmd = list(argv) if name is None else ["nsenter", f"--net={ns_path(name)}", "--",
                                            *argv]
    try:
        return subprocess.Popen(cmd, **popen_kwargs)
    except OSError as e:
        raise NetnsError(e.errno, f"starting {argv[0]} in netns {name}") from None


def unique_name(prefix: str) -> str:
    """A namespace name unused right now: prefix + pid + counter (<= 15 chars keeps
    derived interface names legal)."""
    n = 0
    while True:
        name = f"{prefix}{os.getpid() % 100000}{n}"
        if not os.path.exists(ns_path(name)):
            return name
        n += 1
